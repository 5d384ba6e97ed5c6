"""Coverage matrix: 25 architectures (timm, torchvision, transformers; vision and text) x three real
toolkits, each healed with default block discovery.

Every case asserts: heals, the toolkit's own masks are bit-identical afterwards, masked weights are
zero, the dense model is untouched, and the held-out objective falls (or nothing beat the pruned
model and its weights came back unchanged); or, where the toolkit itself cannot prune the model,
a ``StarfishError`` that names the fix (listed in ``REFUSED``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_state_equal, improved_or_restored, state_copy
from matrix_cases import ARCHS, TOOLKITS, Arch, run_case

from starfish_plugin.errors import StarfishError

pytest.importorskip("transformers")
pytest.importorskip("torch_pruning")

# (architecture, toolkit) -> words the StarfishError must contain: Torch-Pruning cannot prune these
# models as configured, and the error says what to configure.
REFUSED: dict[tuple[str, str], str] = {
    ("timm_mixer", "torch_pruning"): r"(?s)could not prune this MlpMixer.*mlp_tokens.*ignored_layers",
    (
        "timm_pvt_v2",
        "torch_pruning",
    ): r"(?s)produced a PyramidVisionTransformerV2 that cannot run its forward, and starfish could not repair it"
       r".*attn.q.out_features: expected \d+, the attention's input width.*ignored_layers",
    ("hf_gpt2", "torch_pruning"): r"(?s)removed no channel.*Conv1D in GPT-2.*customized_pruners",
}
# Torch-Pruning 1.6.1 itself fails while building its dependency graph (before any starfish code runs).
TOOLKIT_FAILS = {("tv_shufflenet_v2", "torch_pruning"): ZeroDivisionError}
# Cases that take several seconds (the larger CNNs under Torch-Pruning's graph tracing).
SLOW: set[tuple[str, str]] = set()


def _params():
    out = []
    for arch in ARCHS:
        for toolkit in TOOLKITS:
            marks = [pytest.mark.slow] if (arch.name, toolkit) in SLOW else []
            if (arch.name, toolkit) in TOOLKIT_FAILS:
                marks.append(
                    pytest.mark.xfail(
                        raises=TOOLKIT_FAILS[arch.name, toolkit],
                        strict=True,
                        reason="Torch-Pruning's MetaPruner fails on the channel shuffle",
                    )
                )
            out.append(pytest.param(arch, toolkit, id=f"{arch.name}-{toolkit}", marks=marks))
    return out


@pytest.mark.parametrize("arch, toolkit", _params())
def test_heals_with_default_discovery(arch: Arch, toolkit: str) -> None:
    refused = REFUSED.get((arch.name, toolkit))
    dense = arch.build().eval()
    saved_dense = state_copy(dense)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # toolkits' own deprecation chatter
        if refused:
            with pytest.raises(StarfishError, match=refused):
                run_case(arch, toolkit, dense)
            assert_state_equal(dense, saved_dense)
            return
        report, masks_before, masks_after = run_case(arch, toolkit, dense)

    assert report.block_rule and report.blocks
    assert report.mask_unchanged and report.masked_weights_zero
    if toolkit != "torch_pruning":
        assert masks_before, "the toolkit pruned nothing"
    assert masks_before.keys() == masks_after.keys()
    for name, mask in masks_before.items():
        assert torch.equal(mask, masks_after[name]), f"mask of {name} changed"
    assert_state_equal(dense, saved_dense)
    # the judged objective falls (the output no further from the dense one), or nothing beat the
    # pruned model and its weights came back unchanged
    assert improved_or_restored(report), report.held_out_history
    assert all(torch.isfinite(torch.tensor(loss)) for loss in report.epoch_losses)
