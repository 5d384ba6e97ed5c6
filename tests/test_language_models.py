"""Decoder language models heal from unlabeled token ids: padding (attention_mask 0) counts in no
loss term, and Wanda's 2:4 masks stay exactly 2:4. Tiny Llama and GPT-2 built from configs (no hub)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import starfish_plugin as starfish
from starfish_plugin.core.losses import cosine_distance, logit_kl
from starfish_plugin.core.nm_pattern import check_nm

transformers = pytest.importorskip("transformers")
VOCAB, LENGTH, PAD = 64, 12, 0


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def padded_tokens(n: int = 32, pad_id: int = PAD, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded token ids of random lengths 4..LENGTH and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    return {"input_ids": torch.where(mask.bool(), ids, torch.full_like(ids, pad_id)), "attention_mask": mask}


def prune_decoder_(model: nn.Module, amount: float = 0.6) -> nn.Module:
    """L1-unstructured masks on every weight matrix inside the decoder layers (Linear or GPT-2's Conv1D)."""
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    for module in layers.modules():
        if isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 2:
            prune.l1_unstructured(module, "weight", amount=amount)
            module.weight = module.weight.detach()
    return model


def _heal(dense: nn.Module, calibration: dict[str, torch.Tensor], loss: str = "cosine",
          ) -> tuple[nn.Module, starfish.HealReport]:
    pruned = prune_decoder_(copy.deepcopy(dense))  # 60 %: recipe="auto" adds the row-norm warm start
    report = starfish.heal(pruned, dense, calibration, epochs=2, batch_size=8, diagnostic_samples=32, quiet=True,
                           loss=loss)
    return pruned, report


@pytest.mark.parametrize("arch, loss", [("llama", "cosine"), ("gpt2", "cosine"), ("llama", "mse"),
                                        ("llama", "kl")])
def test_padding_tokens_do_not_change_the_heal(arch, loss):
    dense = MODELS[arch]()
    tokens = padded_tokens()
    other_pad = {**tokens, "input_ids": torch.where(tokens["attention_mask"].bool(), tokens["input_ids"], 7)}
    assert not torch.equal(other_pad["input_ids"], tokens["input_ids"])
    healed, report = _heal(dense, tokens, loss)
    healed_other, report_other = _heal(dense, other_pad, loss)
    assert report.recipe_applied and report.epoch_losses == report_other.epoch_losses and report.mask_unchanged
    assert report.block_cosine_after == report_other.block_cosine_after
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    for (name, a), (_, b) in zip(healed.named_parameters(), healed_other.named_parameters()):
        assert torch.equal(a, b), name
    # the control: without the attention mask the padding positions count, and the heals differ
    _, no_mask = _heal(dense, {"input_ids": tokens["input_ids"]}, loss)
    _, no_mask_other = _heal(dense, {"input_ids": other_pad["input_ids"]}, loss)
    assert no_mask.epoch_losses != no_mask_other.epoch_losses


def test_token_losses_leave_padding_out():
    gen = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    garbage = pred.clone()
    garbage[0, 3:] = torch.randn(2, 8, generator=gen) * 100  # padding positions changed
    assert cosine_distance(garbage, target, tokens=mask) == cosine_distance(pred, target, tokens=mask)
    assert cosine_distance(garbage, target) != cosine_distance(pred, target)
    real = torch.cat([pred[0, :3], pred[1]]), torch.cat([target[0, :3], target[1]])
    expected = 1 - torch.nn.functional.cosine_similarity(*real, dim=-1).mean()
    torch.testing.assert_close(cosine_distance(pred, target, tokens=mask), expected)
    logits, dense_logits = torch.randn(2, 5, VOCAB, generator=gen), torch.randn(2, 5, VOCAB, generator=gen)
    noisy = logits.clone()
    noisy[0, 3:] += 50
    assert logit_kl(noisy, dense_logits, tokens=mask) == logit_kl(logits, dense_logits, tokens=mask)


def test_wanda_2_4_on_a_llama_heals_and_stays_2_4():
    from torchao.sparsity import WandaSparsifier

    dense = tiny_llama()
    tokens = padded_tokens()
    pruned = copy.deepcopy(dense)
    names = [f"{n}.weight" for n, m in pruned.model.layers.named_modules() if isinstance(m, nn.Linear)]
    sparsifier = WandaSparsifier(sparsity_level=0.5, semi_structured_block_size=4)
    sparsifier.prepare(pruned, [{"tensor_fqn": f"model.layers.{n}"} for n in names])
    with torch.no_grad():
        pruned(**tokens)  # Wanda's activation observers need data
    sparsifier.step()
    report = starfish.heal(pruned, dense, tokens, epochs=3, batch_size=8, quiet=True)
    assert report.mask_unchanged and report.masked_weights_zero
    assert sum(report.block_cosine_after.values()) > sum(report.block_cosine_before.values())
    sparsifier.squash_mask()
    for n in names:
        check_nm(pruned.get_parameter(f"model.layers.{n}"), n, 2, 4)
