"""The Torch-Pruning post-prune hook on every model Torch-Pruning's own examples prune (issue 31).

Architectures taken from the lists Torch-Pruning's examples prune (its torchvision list, its timm
script, its Hugging Face ViT / BERT / Swin / LLM examples), built offline at a small size with
random weights. Each is pruned the way those examples set the pruner up, as a new user would copy
it: ``MetaPruner`` with the model's own example input, ``GroupMagnitudeImportance``, ratio 0.5,
the classifier in ``ignored_layers``, ``num_heads`` for timm's fused-``qkv`` attention, for
Hugging Face query/key/value projections and for ``nn.MultiheadAttention``, ``output_transform``
for Hugging Face outputs; decoder LMs as the LLM example does (whole heads, ``lm_head`` ignored).

The rule, fixed with the case list before any result was seen:

* **Torch-Pruning alone**: on a copy, no starfish involved, the pruner is built and ``step()``
  runs within 60 s and removes parameters. Cases where it does not are not counted (reason
  recorded). Whether that pruned model still runs its example input is recorded too.
* **attach**: on a fresh copy, ``starfish.attach(pruner, dense, calibration)`` then ``step()``,
  every heal setting at its default. A case **heals and improves** when the heal's own held-out
  judgement improved (objective fell, final output no further from the dense model's), and on
  128 samples it never saw the final output is no further from the dense model's than the
  pruned model's; it is **restored** when nothing helped and the pruned weights came back, the
  report saying so. **Repaired**: the model Torch-Pruning left did not run, attach's repair made
  it run. **Refused**: a ``StarfishError`` (reason recorded); **error**: anything else.

    python -m benchmarks.tp_matrix                  # every case -> results/tp_matrix.json
    python -m benchmarks.tp_matrix run timm_swin    # only these cases, replacing their rows
    python -m benchmarks.results_page               # the docs' table from the JSON
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
OUT = ROOT / "results" / "tp_matrix.json"
N_CALIBRATION, N_UNSEEN, TP_SECONDS, RATIO = 256, 128, 60, 0.5


def _cases() -> list[tuple[str, Any]]:
    """(family, Arch) for every case: the list is fixed here, before any result."""
    import torchvision
    from matrix_cases import (
        ARCHS,
        IMAGE,
        MORE_ARCHS,
        VOCAB,
        Arch,
        _hf,
        _seeded,
        _timm,
    )

    known = {a.name: a for a in [*ARCHS, *MORE_ARCHS]}

    def tv(builder: Callable[[], nn.Module], name: str, image: int = IMAGE) -> Any:
        return Arch(name, _seeded(builder), image=image)

    def resnet(block: str, **kwargs: Any) -> Callable[[], nn.Module]:
        from torchvision.models import resnet as r

        return partial(r.ResNet, getattr(r, block), [1, 1, 1, 1], num_classes=10, **kwargs)

    def timm_small(name: str, **kwargs: Any) -> Any:
        return Arch(f"timm_{name.split('_')[0]}", _timm(name, **kwargs))

    lm = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              use_cache=False)
    vision = "vision transformer"
    cases = [
        # torchvision: Torch-Pruning's examples/torchvision_models list (swin and shufflenet are on its failure list)
        ("CNN", tv(partial(torchvision.models.AlexNet, num_classes=10), "tv_alexnet", image=64)),
        ("CNN", known["tv_vgg11_bn"]), ("CNN", known["tv_resnet"]),
        ("CNN", tv(resnet("Bottleneck"), "tv_resnet50")),
        ("CNN", tv(resnet("Bottleneck", groups=32, width_per_group=4), "tv_resnext50_32x4d")),
        ("CNN", tv(resnet("Bottleneck", width_per_group=128), "tv_wide_resnet50_2")),
        ("CNN", known["tv_densenet"]), ("CNN", known["tv_mobilenet_v2"]), ("CNN", known["tv_mobilenet_v3_small"]),
        ("CNN", tv(partial(torchvision.models.mobilenet_v3_large, num_classes=10, width_mult=0.25),
                   "tv_mobilenet_v3_large")),
        ("CNN", tv(partial(torchvision.models.efficientnet_b0, num_classes=10), "tv_efficientnet_b0")),
        ("CNN", known["tv_efficientnet_v2"]), ("CNN", known["tv_mnasnet"]), ("CNN", known["tv_regnet"]),
        ("CNN", known["tv_squeezenet"]), ("CNN", known["tv_googlenet"]), ("CNN", known["tv_convnext"]),
        ("CNN", known["tv_shufflenet_v2"]),
        (vision, known["tv_vit"]), ("hierarchical vision transformer", known["tv_swin"]),
        # timm: Torch-Pruning's examples/timm_models script prunes any timm model; these families
        (vision, known["timm_vit"]),
        (vision, timm_small("deit_tiny_patch16_224", img_size=IMAGE, patch_size=8, depth=2, embed_dim=32,
                            num_heads=2)),
        (vision, timm_small("beit_base_patch16_224", img_size=IMAGE, patch_size=8, depth=2, embed_dim=32,
                            num_heads=2)),
        (vision, known["timm_convit"]),
        ("hierarchical vision transformer", known["timm_swin"]),
        ("hierarchical vision transformer", known["timm_pvt_v2"]),
        ("hierarchical vision transformer", known["timm_twins_svt"]),
        ("hierarchical vision transformer", known["timm_levit"]),
        ("MLP / pooling mixer", known["timm_poolformer"]), ("MLP / pooling mixer", known["timm_mixer"]),
        ("CNN", known["timm_convnext"]), ("CNN", known["timm_resnet"]), ("CNN", known["timm_efficientnet"]),
        ("CNN", known["timm_mobilenetv3"]), ("CNN", known["timm_regnet"]), ("CNN", known["timm_repvgg"]),
        ("CNN", timm_small("ghostnet_050")), ("CNN", timm_small("dla34")),
        ("hybrid conv-attention", known["timm_coatnet"]), ("hybrid conv-attention", known["timm_mobilevit"]),
        # Hugging Face: Torch-Pruning's examples/transformers (ViT, BERT, Swin) and examples/LLMs
        (vision, known["hf_vit"]), (vision, known["hf_dinov2"]),
        ("hierarchical vision transformer", known["hf_swin"]),
        ("text encoder", known["hf_bert"]),
        ("text encoder", Arch("hf_roberta", _hf("RobertaConfig", "RobertaForSequenceClassification",
                                                vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64, num_labels=3,
                                                max_position_embeddings=40), text=True)),
        ("CNN", known["hf_convnext"]), ("CNN", known["hf_resnet"]),
        ("decoder LM", Arch("hf_llama", _hf("LlamaConfig", "LlamaForCausalLM", **lm, num_key_value_heads=2),
                            text=True)),
        ("decoder LM", Arch("hf_qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", **lm, num_key_value_heads=2),
                            text=True)),
        ("decoder LM", known["hf_gpt2"]),
    ]
    return cases


def _classifier(model: nn.Module) -> list[nn.Module]:
    """The output layer(s), as the examples ignore them: the last Linear (or 1x1 Conv for SqueezeNet)."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.ModuleList):  # two-branch heads (CrossViT)
        return list(head)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return [layers[-1]] if layers else []


def _num_heads(model: nn.Module, decoder: bool) -> dict[nn.Module, int]:
    """``num_heads`` as Torch-Pruning's examples build it: timm fused ``qkv`` (timm script), Hugging
    Face query/key/value (transformers examples; key/value heads for decoders, LLM example),
    ``nn.MultiheadAttention`` (torchvision example's channel groups)."""
    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int):
            heads[m.qkv] = m.num_heads
        if isinstance(m, nn.MultiheadAttention):
            heads[m] = m.num_heads
        for q, k, v in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
            if isinstance(getattr(m, q, None), nn.Linear):
                config = getattr(m, "config", None)
                n = getattr(m, "num_attention_heads", None) or getattr(config, "num_attention_heads", None)
                kv = getattr(config, "num_key_value_heads", None) or n if decoder else n
                if n:
                    heads.update({getattr(m, q): n, getattr(m, k): kv, getattr(m, v): kv})
    return heads


def settings(model: nn.Module) -> dict[str, Any]:
    """The pruner's arguments, as Torch-Pruning's examples set them for this kind of model."""
    import torch_pruning as tp

    from starfish_plugin.base.model_io import main_output

    hf = type(model).__module__.startswith("transformers")
    decoder = hf and "CausalLM" in type(model).__name__
    kwargs: dict[str, Any] = {"importance": tp.importance.GroupMagnitudeImportance(p=2), "pruning_ratio": RATIO,
                              "ignored_layers": _classifier(model), "num_heads": _num_heads(model, decoder)}
    if hf:
        kwargs["output_transform"] = lambda out: main_output(out).sum()
    if decoder:  # the LLM example: whole heads, head size (rotary) untouched
        kwargs |= {"prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": RATIO}
    return kwargs


def _pruner(model: nn.Module, example: Any) -> Any:
    import torch_pruning as tp

    from starfish_plugin.adapters.tp_build import cache_off

    with cache_off(model):
        return tp.pruner.MetaPruner(model, example, **settings(model))


def toolkit_alone(dense: nn.Module, example: Any) -> tuple[nn.Module | None, str, bool]:
    """(the model Torch-Pruning alone pruned or ``None``, why not, whether that model runs)."""
    from benchmarks.coverage_matrix import _call, _time_limit, _TooLong

    model = copy.deepcopy(dense)
    try:
        with _time_limit(TP_SECONDS):
            pruner = _pruner(model, example)
            pruner.step()
    except _TooLong:
        return None, f"Torch-Pruning did not finish in {TP_SECONDS} s", False
    except Exception as exc:  # noqa: BLE001 - the toolkit's own failure is the datum
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", False
    if sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dense.parameters()):
        return None, "Torch-Pruning removed no parameter", False
    try:
        with torch.no_grad():
            _call(model.eval(), example)
        runs = True
    except Exception:  # noqa: BLE001 - recorded: the model the pruner left does not run
        runs = False
    return model, "", runs


def _start_recorder() -> Any:
    """A plugin that keeps a copy of the model as the heal starts: pruned and repaired, not trained."""
    import starfish_plugin as starfish

    class HealStart:
        model: nn.Module | None = None

        @starfish.hookimpl
        def starfish_heal_started(self, model: nn.Module) -> None:
            self.model = copy.deepcopy(model).eval()

    return HealStart()


def run_case(family: str, arch: Any) -> dict[str, Any]:
    from matrix_cases import example_batch

    import starfish_plugin as starfish
    from benchmarks.coverage_matrix import _data, _output_cosine
    from starfish_plugin.errors import StarfishError

    row: dict[str, Any] = {"architecture": arch.name, "family": family}
    dense = arch.build().eval()
    calibration, unseen = _data(arch, "train", N_CALIBRATION), _data(arch, "test", N_UNSEEN)
    example = example_batch(arch, calibration)
    alone, why, runs = toolkit_alone(dense, example)
    if alone is None:
        return row | {"status": "toolkit_cannot_prune", "reason": why}
    row["pruned_runs_as_left"] = runs
    model = copy.deepcopy(dense)
    start = time.perf_counter()
    recorder = _start_recorder()
    starfish.plugin_manager().register(recorder)
    try:
        pruner = _pruner(model, example)
        handle = starfish.attach(pruner, dense, calibration, quiet=True)
        pruner.step()
        report = handle.reports[-1]
    except StarfishError as exc:
        return row | {"status": "refused", "reason": f"{type(exc).__name__}: {str(exc)[:400]}"}
    except Exception as exc:  # noqa: BLE001 - recorded: a raw error is a defect the table shows
        return row | {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
                      "traceback": traceback.format_exc(limit=-3)}
    finally:
        starfish.plugin_manager().unregister(recorder)
    row["seconds"] = time.perf_counter() - start
    before = recorder.model  # pruned and repaired, as the heal started
    assert before is not None, "the heal did not start"
    restored = report.worse_restored and all(torch.equal(v, before.state_dict()[k])
                                             for k, v in model.state_dict().items())
    before_cos, after_cos = report.output_cosine_before, report.output_cosine_after
    output_ok = before_cos is None or after_cos is None or after_cos >= before_cos
    judged_ok = restored or (report.held_out_after < report.held_out_before and output_ok)
    unseen_before, unseen_after = _output_cosine(before, dense, unseen), _output_cosine(model, dense, unseen)
    unseen_ok = restored or (unseen_before is not None and unseen_after is not None
                             and unseen_after >= unseen_before - 1e-6)
    notes = [n for n in report.notes if n.startswith(("repaired after", "num_heads given"))]
    return row | {
        "status": "healed", "restored": restored, "worse_restored": report.worse_restored,
        "improved": judged_ok and unseen_ok and not report.worse_restored, "judged_ok": judged_ok,
        "unseen_ok": unseen_ok, "repaired": not runs, "repairs": notes,
        "unseen_output_cosine_before": unseen_before, "unseen_output_cosine_after": unseen_after,
        "held_out_before": report.held_out_before, "held_out_after": report.held_out_after,
        "mean_cosine_before": report.mean_cosine_before, "mean_cosine_after": report.mean_cosine_after,
        "output_cosine_before": before_cos, "output_cosine_after": after_cos,
        "blocks": len(report.blocks), "parameters_dense": report.parameters_dense,
        "parameters_pruned": report.parameters_pruned,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    counted = [r for r in rows if r["status"] != "toolkit_cannot_prune"]
    healed = [r for r in counted if r["status"] == "healed"]
    improved = sum(r["improved"] for r in healed)
    gains = [r["mean_cosine_after"] - r["mean_cosine_before"] for r in healed if r["improved"]]
    return {
        "architectures": len(rows), "toolkit_cannot_prune": len(rows) - len(counted),
        "pruned_by_toolkit_alone": len(counted),
        "ran_as_pruned": sum(bool(r.get("pruned_runs_as_left")) for r in counted),
        "repaired": sum(bool(r.get("repaired")) for r in healed), "healed": len(healed),
        "improved": improved, "restored": sum(r["restored"] for r in healed),
        "ended_worse": sum(not r["judged_ok"] or not r["unseen_ok"] for r in healed),
        "refused": sum(r["status"] == "refused" for r in counted),
        "errors": sum(r["status"] == "error" for r in counted),
        "share_improved_or_restored": (improved + sum(r["restored"] for r in healed)) / len(counted)
        if counted else None,
        "median_block_cosine_gain": statistics.median(gains) if gains else None,
    }


def run(only: list[str]) -> None:
    from benchmarks.common import guarded_case, hardware

    torch.set_num_threads(2)
    saved = json.loads(OUT.read_text()) if only and OUT.exists() else {}
    old = {r["architecture"]: r for r in saved.get("rows", [])}
    rows = []
    for family, arch in _cases():
        if only and not any(o in arch.name for o in only):
            if arch.name in old:
                rows.append(old[arch.name])
            continue
        row = guarded_case(run_case, family, arch, identity={"architecture": arch.name, "family": family})
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
        rows.append(row)
        OUT.write_text(json.dumps({
            "benchmark": "tp_matrix", "rule": __doc__.split("The rule, fixed with the case list before any result "
                                                           "was seen:")[1].split("    python")[0].strip(),
            "settings": f"random-init models; {N_CALIBRATION} calibration samples (Fashion-MNIST train images "
                        f"resized, or King James bytes), {N_UNSEEN} unseen (test split); MetaPruner ratio {RATIO}, "
                        "GroupMagnitudeImportance(p=2), set up as Torch-Pruning's examples do; HealConfig() defaults",
            "summary": summarize(rows), "hardware": hardware(), "rows": rows,
        }, indent=1))
    print(json.dumps(summarize(rows), indent=1))


if __name__ == "__main__":
    run(sys.argv[2:] if sys.argv[1:2] == ["run"] else [])
