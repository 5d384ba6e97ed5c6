"""The text demo end to end on the real King James text (Debian's bible-kjv-text) and the shipped
decoder LM: Wanda 2:4 raises held-out perplexity, healing brings it back down, 2:4 stays exact."""

from __future__ import annotations

import shutil

import pytest

from starfish_plugin.cli.main import main


@pytest.mark.slow
def test_text_demo_heals_a_wanda_24_language_model(capsys):
    if shutil.which("bible") is None:
        pytest.fail("bible-kjv-text is not installed: `make data` installs it (apt-get install -y bible-kjv-text)")
    from starfish_plugin.demo.text_demo import run_text_demo

    result = run_text_demo(epochs=2, n_calibration=64, n_test=32, quiet=True)
    assert result["pruned_perplexity"] > result["dense_perplexity"] * 1.05, result
    assert result["healed_perplexity"] < result["pruned_perplexity"], result
    assert result["still_2_4"] and result["mask_unchanged"]
    assert result["mean_block_cosine_after"] > result["mean_block_cosine_before"]
    assert main(["demo", "--task", "text", "--epochs", "1", "--calibration", "32", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "healed (STARFISH)" in out and "still exactly 2:4" in out
