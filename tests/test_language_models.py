"""Decoder language models heal from unlabeled token ids: padding (attention_mask 0) counts in no
loss term, and Wanda's 2:4 masks stay exactly 2:4. Tiny Llama and GPT-2 built from configs (no hub)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import starfish_plugin as starfish
from starfish_plugin.core.losses import cosine_distance, logit_kl, next_token_ce
from starfish_plugin.core.nm_pattern import check_nm
from starfish_plugin.errors import CalibrationError

transformers = pytest.importorskip("transformers")
VOCAB, LENGTH, PAD = 64, 12, 0


def tiny_llama(layers: int = 2) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
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
    pruned = prune_decoder_(copy.deepcopy(dense))  # 60 %, with the closed-form warm start (its sums too skip padding)
    report = starfish.heal(pruned, dense, calibration, epochs=2, batch_size=8, diagnostic_samples=32, quiet=True,
                           loss=loss, warm_start="lstsq")
    return pruned, report


@pytest.mark.parametrize("arch, loss", [("llama", "cosine"), ("gpt2", "cosine"), ("llama", "mse"),
                                        ("llama", "kl"), ("gpt2", "next_token")])
def test_padding_tokens_do_not_change_the_heal(arch, loss):
    dense = MODELS[arch]()
    tokens = padded_tokens()
    other_pad = {**tokens, "input_ids": torch.where(tokens["attention_mask"].bool(), tokens["input_ids"], 7)}
    assert not torch.equal(other_pad["input_ids"], tokens["input_ids"])
    healed, report = _heal(dense, tokens, loss)
    healed_other, report_other = _heal(dense, other_pad, loss)
    assert report.warm_start_changed and report.epoch_losses == report_other.epoch_losses and report.mask_unchanged
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


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_next_token_loss_is_the_models_own_language_modelling_loss(arch):
    model, tokens = MODELS[arch](), padded_tokens(8)
    labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)  # HF's ignore index
    with torch.no_grad():
        out = model(**tokens, labels=labels)
    ours = next_token_ce(out.logits, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(ours, out.loss)
    shifted = torch.where(tokens["attention_mask"].bool(), tokens["input_ids"], 5)  # other padding ids
    assert next_token_ce(out.logits, shifted, tokens["attention_mask"]) == ours


def test_next_token_heal_lowers_the_loss_it_trains_and_needs_token_ids():
    dense = tiny_llama()
    tokens = padded_tokens()
    pruned, report = _heal(dense, tokens, "next_token")
    assert report.epoch_losses[-1] < report.epoch_losses[0] and report.mask_unchanged
    images = torch.randn(16, 3, 8, 8)
    classifier = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(144, 10))
    pruned_classifier = copy.deepcopy(classifier)
    prune.l1_unstructured(pruned_classifier[2], "weight", amount=0.5)
    before = {k: v.clone() for k, v in pruned_classifier.state_dict().items()}
    with pytest.raises(CalibrationError, match="next_token.*integer token ids"):
        starfish.heal(pruned_classifier, classifier, images, loss="next_token", blocks=["0", "2"], quiet=True)
    assert all(torch.equal(before[k], v) for k, v in pruned_classifier.state_dict().items())


@pytest.mark.parametrize("form", ["prune_hook", "parametrization"])
def test_a_pruned_tied_lm_head_stays_tied_and_masked(form):
    """A Llama with tie_word_embeddings: the LM head's weight is the embedding's. Pruning the head
    prunes that shared tensor; healing keeps it shared, keeps the mask, leaves the embedding's
    masked entries as they were, and does not warm-start it (scaling the head's rows would scale
    the embedding)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                      tie_word_embeddings=True)
    dense = transformers.LlamaForCausalLM(config).eval()
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    pruned = prune_decoder_(copy.deepcopy(dense))
    if form == "prune_hook":
        prune.l1_unstructured(pruned.lm_head, "weight", amount=0.6)
        shared = pruned.lm_head.weight_orig
        mask = pruned.lm_head.weight_mask.bool()
    else:
        from torch.ao.pruning import WeightNormSparsifier

        sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
        sparsifier.prepare(pruned, [{"tensor_fqn": "lm_head.weight"}])
        sparsifier.step()
        shared = pruned.lm_head.parametrizations.weight.original
        mask = pruned.lm_head.parametrizations.weight[0].mask.bool()
    assert shared is pruned.model.embed_tokens.weight and not mask.all()
    embedding_before = shared.detach().clone()
    warm_start = "row_norm" if form == "prune_hook" else "lstsq"  # neither may touch the shared tensor
    report = starfish.heal(pruned, dense, padded_tokens(), epochs=2, batch_size=8, quiet=True, warm_start=warm_start)
    head = pruned.lm_head
    shared_after = head.weight_orig if form == "prune_hook" else head.parametrizations.weight.original
    assert shared_after is pruned.model.embed_tokens.weight  # still tied
    assert report.mask_unchanged
    assert torch.equal(pruned.lm_head.weight[~mask], torch.zeros_like(pruned.lm_head.weight[~mask]))
    assert torch.equal(shared_after.detach()[~mask], embedding_before[~mask])  # masked entries untouched
    assert not torch.equal(shared_after.detach()[mask], embedding_before[mask])  # surviving ones trained
    assert report.warm_start_changed == len(starfish.find_masks(pruned)) - 1  # all but the tied head
    assert all(torch.equal(dense_state[k], v) for k, v in dense.state_dict().items())


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_gradient_checkpointing_reaches_the_same_weights_and_puts_everything_back(arch):
    dense, tokens = MODELS[arch](), padded_tokens()
    plain, report = _heal(dense, tokens)
    pruned = prune_decoder_(copy.deepcopy(dense))
    recomputed = starfish.heal(pruned, dense, tokens, epochs=2, batch_size=8, diagnostic_samples=32, quiet=True,
                               gradient_checkpointing=True, warm_start="lstsq")
    assert recomputed.epoch_losses == report.epoch_losses
    for (name, a), (_, b) in zip(plain.named_parameters(), pruned.named_parameters()):
        assert torch.equal(a, b), name
    layers = pruned.model.layers if arch == "llama" else pruned.transformer.h
    assert all("forward" not in layer.__dict__ for layer in layers) and pruned.config.use_cache


def test_a_bf16_language_model_heals_in_bf16():
    dense = tiny_llama().to(torch.bfloat16)
    pruned = prune_decoder_(copy.deepcopy(dense))
    report = starfish.heal(pruned, dense, padded_tokens(), epochs=2, batch_size=8, quiet=True)
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert report.mask_unchanged and report.masked_weights_zero
    assert {p.dtype for p in pruned.parameters()} == {torch.bfloat16}


def test_torch_pruning_mlp_width_pruned_llama_heals():
    from starfish_plugin.adapters.recipes import prune_llama_mlp_width_

    dense, tokens = tiny_llama(), padded_tokens()
    pruned = copy.deepcopy(dense)
    prune_llama_mlp_width_(pruned, tokens["input_ids"][:2], 0.5)
    for layer, dense_layer in zip(pruned.model.layers, dense.model.layers):
        assert layer.mlp.gate_proj.out_features == dense_layer.mlp.gate_proj.out_features // 2
        assert layer.self_attn.q_proj.weight.shape == dense_layer.self_attn.q_proj.weight.shape
    report = starfish.heal(pruned, dense, tokens, epochs=3, batch_size=8, quiet=True)
    assert report.parameters_pruned < report.parameters_dense and report.macs_pruned < report.macs_dense
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    assert sum(report.block_cosine_after.values()) > sum(report.block_cosine_before.values())


def test_next_token_edge_cases_are_clear():
    """int32 token ids train (cross_entropy takes int64 targets: converted); 'ce' and 'next_token'
    cannot be mixed; a module listed twice is checkpointed once and put back."""
    from starfish_plugin.core.recompute import recompute_blocks
    from starfish_plugin.errors import ConfigError

    dense = tiny_llama()
    tokens = padded_tokens()
    short = {k: v.to(torch.int32) if k == "input_ids" else v for k, v in tokens.items()}
    _, report = _heal(dense, short, "next_token")
    assert report.epoch_losses[-1] < report.epoch_losses[0]
    with pytest.raises(ConfigError, match="cannot be mixed"):
        _heal(dense, tokens, "ce+next_token")
    with recompute_blocks(dense, ["model.layers.0", "model.layers.0"]):
        assert dense.config.use_cache is False
    assert "forward" not in dense.model.layers[0].__dict__ and dense.config.use_cache
