"""Coverage judged on improvement: every architecture of ``tests/matrix_cases.py`` (``ARCHS`` and
``MORE_ARCHS``) x three real toolkits, each model freshly built (random init, as a user's own
model before training), calibrated on real data (Fashion-MNIST images resized to the model's
input, or King James text as bytes), pruned, and healed with the library's defaults.

The rule, fixed before any result was seen:

* **judged**: the heal's own held-out judgement improved (the objective fell and the final output
  came no further from the dense model's), or nothing did and the pruned weights came back bit
  for bit, the report saying so. A case that ends below its starting held-out score fails.
* **unseen**: on 128 samples the heal never saw (the test split), the cosine of the final output
  to the dense model's is not lower than the pruned model's, or the weights are the pruned ones.
* Cases the toolkit itself cannot prune (it raises, finds no layer, or its pruned model no longer
  runs) are counted apart with the toolkit's error, and so are cases starfish refuses.

    python -m benchmarks.coverage_matrix                 # every case -> results/coverage_matrix.json
    python -m benchmarks.coverage_matrix run hf_ timm_vit  # only the cases whose id contains one of these
    python -m benchmarks.results_page                    # the docs' tables from the JSON
"""

from __future__ import annotations

import copy
import functools
import json
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
OUT = ROOT / "results" / "coverage_matrix.json"
# Each architecture's family, for the counts (fixed with the case list, before any result).
GROUPS = {
    "vision transformer": ["timm_vit", "tv_vit", "hf_vit", "hf_dinov2"],
    "hierarchical / multi-scale": ["timm_swin", "timm_pvt_v2", "tv_swin", "hf_swin", "timm_twins_svt",
                                   "timm_focalnet", "timm_crossvit", "timm_mvitv2", "timm_nest"],
    "hybrid conv-attention": ["timm_coatnet", "timm_mobilevit", "timm_levit", "timm_efficientformer_v2",
                              "timm_edgenext", "timm_convit", "tv_maxvit", "hf_mobilevit"],
    "re-parameterised": ["timm_repvgg", "timm_mobileone", "timm_repvit", "timm_fastvit"],
    "CNN": ["timm_convnext", "timm_resnet", "timm_efficientnet", "timm_mobilenetv3", "timm_regnet", "tv_resnet",
            "tv_mobilenet_v3_small", "tv_regnet", "tv_shufflenet_v2", "tv_densenet", "tv_vgg11_bn", "tv_convnext",
            "hf_convnext", "tv_mnasnet", "tv_squeezenet", "tv_efficientnet_v2", "tv_mobilenet_v2", "tv_googlenet",
            "hf_resnet", "hf_convnextv2"],
    "MLP / pooling mixer": ["timm_mixer", "timm_poolformer"],
    "text encoder": ["hf_bert"],
    "decoder LM": ["hf_llama", "hf_gpt2", "hf_qwen2", "hf_mistral", "hf_gemma", "hf_phi", "hf_phi3", "hf_gpt_neox",
                   "hf_opt"],
}
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}
N_CALIBRATION, N_UNSEEN = 256, 128
TP_SECONDS = 60
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


@functools.cache
def _fashion_mnist(split: str) -> torch.Tensor:
    from starfish_plugin.demo.datasets import load_fashion_mnist

    return load_fashion_mnist(split)[0]


def _images(split: str, n: int, size: int) -> torch.Tensor:
    """Fashion-MNIST images of ``split``, resized to ``size`` and given three channels, normalized."""
    x = _fashion_mnist(split)
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]
    x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    return ((x - FMNIST_MEAN) / FMNIST_STD).expand(-1, 3, -1, -1).contiguous()


def _text(split: str, n: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    """King James text as bytes (ASCII, below ``vocab``), ``n`` sequences of ``length``."""
    from starfish_plugin.demo.text import kjv_splits

    data = " ".join(kjv_splits()[split]).encode("ascii", "ignore")
    ids = torch.tensor([b % vocab for b in data[: n * length]], dtype=torch.long).reshape(n, length)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _data(arch: Any, split: str, n: int) -> Any:
    from matrix_cases import SEQ, VOCAB

    return _text(split, n, SEQ, VOCAB) if arch.text else _images(split, n, getattr(arch, "image", 32))


def _call(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, dict) else model(x)


@torch.no_grad()
def _output_cosine(model: nn.Module, dense: nn.Module, x: Any) -> float | None:
    """Mean cosine of the final output (per token for sequences) to the dense model's."""
    from starfish_plugin.base.model_io import main_output
    from starfish_plugin.core.losses import cosine_distance

    model.eval()
    out, ref = main_output(_call(model, x)), main_output(_call(dense, x))
    if not isinstance(out, torch.Tensor) or out.shape != ref.shape:
        return None
    tokens = x.get("attention_mask") if isinstance(x, dict) else None
    return 1.0 - float(cosine_distance(out, ref, "auto", tokens))


@torch.no_grad()
def _block_cosine(model: nn.Module, dense: nn.Module, x: Any, blocks: list[str]) -> float | None:
    """Mean over blocks of the cosine of each block's output to the dense block's (same widths only)."""
    from starfish_plugin.base.outputs import capture_outputs
    from starfish_plugin.core.losses import cosine_distance

    blocks = [b for b in blocks if b != "(output)"]
    if not blocks:
        return None
    tokens = x.get("attention_mask") if isinstance(x, dict) else None
    with capture_outputs(model, blocks) as out, capture_outputs(dense, blocks) as ref:
        _call(model.eval(), x)
        _call(dense, x)
        if any(b not in out or b not in ref or out[b].shape != ref[b].shape for b in blocks):
            return None  # a block the forward skips, or one whose width pruning changed
        return sum(1.0 - float(cosine_distance(out[b], ref[b], "auto", tokens)) for b in blocks) / len(blocks)


def _unseen(model: nn.Module, dense: nn.Module, x: Any, blocks: list[str]) -> dict[str, float | None]:
    return {"output": _output_cosine(model, dense, x), "blocks": _block_cosine(model, dense, x, blocks)}


def _tp_pruner(arch: Any, model: nn.Module, example: Any) -> Any:
    import torch_pruning as tp

    return tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                pruning_ratio=0.3, ignored_layers=arch.keep(model), **arch.tp_kwargs(model))


class _TooLong(Exception):
    pass


@contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise ``_TooLong`` in this (main) thread after ``seconds``: Torch-Pruning 1.6.1 never returns
    from building the graph of some models (its dependency fix-up keeps growing a group)."""
    def stop(*_args: Any) -> None:
        raise _TooLong

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _toolkit_alone(arch: Any, toolkit: str, dense: nn.Module, calibration: Any) -> tuple[nn.Module | None, str]:
    """Prune a copy with the toolkit alone; the model, or ``None`` and why the toolkit could not.
    After a Torch-Pruning step the attention modules' head counts and sizes are brought in line
    with the pruned shapes, as Torch-Pruning's own examples do by hand (``tp_graph.sync_attention``)."""
    from matrix_cases import example_batch, prune_global_l1, sparsify_2_4, toolkit_masks

    from starfish_plugin.adapters import tp_graph

    model = copy.deepcopy(dense)
    try:
        if toolkit == "global_l1":
            prune_global_l1(model)
        elif toolkit == "ao_2_4":
            sparsify_2_4(model)
            if not toolkit_masks(model):
                return None, "no Linear layer whose rows split into groups of four"
        else:
            with _time_limit(TP_SECONDS):
                pruner = _tp_pruner(arch, model, example_batch(arch, calibration))
                pruner.step()
            tp_graph.sync_attention(model, pruner)
            if sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dense.parameters()):
                return None, "Torch-Pruning removed no channel"
        _call(model.eval(), example_batch(arch, calibration))
    except _TooLong:
        return None, f"Torch-Pruning did not finish building its dependency graph in {TP_SECONDS} s"
    except Exception as exc:  # noqa: BLE001 - the toolkit's own failure is the datum
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return model, ""


def run_case(arch: Any, toolkit: str) -> dict[str, Any]:
    from helpers import state_copy
    from matrix_cases import example_batch

    import starfish_plugin as starfish
    from starfish_plugin.errors import StarfishError

    row: dict[str, Any] = {"architecture": arch.name, "toolkit": toolkit}
    dense = arch.build().eval()
    calibration, unseen = _data(arch, "train", N_CALIBRATION), _data(arch, "test", N_UNSEEN)
    alone, why = _toolkit_alone(arch, toolkit, dense, calibration)
    if alone is None:
        return row | {"status": "toolkit_cannot_prune", "reason": why}
    try:
        blocks = starfish.find_blocks(dense)
    except StarfishError as exc:
        return row | {"status": "refused", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    row["unseen_before"] = _unseen(alone, dense, unseen, blocks)
    pruned_state = state_copy(alone)
    start = time.perf_counter()
    try:
        if toolkit == "torch_pruning":
            model = copy.deepcopy(dense)
            pruner = _tp_pruner(arch, model, example_batch(arch, calibration))
            handle = starfish.attach(pruner, dense, calibration, quiet=True)
            pruner.step()
            report = handle.reports[-1]
        else:
            model = alone
            report = starfish.heal(model, dense, calibration, quiet=True)
    except StarfishError as exc:
        return row | {"status": "refused", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
    except Exception as exc:  # noqa: BLE001 - recorded: a raw error is a defect the table shows
        return row | {"status": "error", "reason": f"{type(exc).__name__}: {str(exc)[:300]}",
                      "traceback": traceback.format_exc(limit=-3)}
    row["seconds"] = time.perf_counter() - start
    after = _unseen(model, dense, unseen, blocks)
    restored = report.worse_restored and all(torch.equal(v, pruned_state[k]) for k, v in model.state_dict().items())
    before_cos, after_cos = report.output_cosine_before, report.output_cosine_after
    output_ok = before_cos is None or after_cos is None or after_cos >= before_cos
    judged_ok = restored or (report.held_out_after < report.held_out_before and output_ok)
    before_out, after_out = row["unseen_before"]["output"], after["output"]
    unseen_ok = restored or (before_out is not None and after_out is not None and after_out >= before_out)
    return row | {
        "status": "healed", "unseen_after": after, "restored": restored, "worse_restored": report.worse_restored,
        "judged_ok": judged_ok, "unseen_ok": unseen_ok, "improved": judged_ok and not report.worse_restored,
        "held_out_before": report.held_out_before, "held_out_after": report.held_out_after,
        "judged_mean_cosine_before": report.mean_cosine_before, "judged_mean_cosine_after": report.mean_cosine_after,
        "judged_output_cosine_before": report.output_cosine_before,
        "judged_output_cosine_after": report.output_cosine_after,
        "returned_state": report.returned_state, "recipe": report.recipe_applied, "blocks": len(report.blocks),
        "rule": report.block_rule, "mask_unchanged": report.mask_unchanged,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    healed = [r for r in rows if r["status"] == "healed"]
    gains = [r["judged_mean_cosine_after"] - r["judged_mean_cosine_before"] for r in healed if r["improved"]]
    return {
        "cases": len(rows), "toolkit_cannot_prune": sum(r["status"] == "toolkit_cannot_prune" for r in rows),
        "refused": sum(r["status"] == "refused" for r in rows), "errors": sum(r["status"] == "error" for r in rows),
        "healed": len(healed), "improved": sum(r["improved"] for r in healed),
        "restored": sum(r["restored"] for r in healed), "judged_ok": sum(r["judged_ok"] for r in healed),
        "unseen_ok": sum(r["unseen_ok"] for r in healed),
        "median_judged_cosine_gain": statistics.median(gains) if gains else None,
    }


def run(only: list[str]) -> None:
    """Heal every case (or, with ``only``, the cases whose ``architecture-toolkit`` id contains one
    of those strings, replacing their rows in the saved JSON)."""
    from matrix_cases import ARCHS, MORE_ARCHS, TOOLKITS

    from benchmarks.common import guarded_case, hardware

    torch.set_num_threads(2)
    archs = [*ARCHS, *MORE_ARCHS]
    saved = json.loads(OUT.read_text()) if only and OUT.exists() else {}
    old = {(r["architecture"], r["toolkit"]): r for r in saved.get("rows", [])} if "summary" in saved else {}
    rows = []
    for arch in archs:
        for toolkit in TOOLKITS:
            if only and not any(o in f"{arch.name}-{toolkit}" for o in only):
                if (arch.name, toolkit) in old:
                    rows.append(old[arch.name, toolkit])
                continue
            row = guarded_case(run_case, arch, toolkit, identity={"architecture": arch.name, "toolkit": toolkit})
            row["new_family"] = arch in MORE_ARCHS
            row["group"] = GROUP_OF[arch.name]
            print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
            rows.append(row)
            _write(rows + [old[key] for key in old if key not in {(r["architecture"], r["toolkit"]) for r in rows}],
                   hardware())  # after every case: an interrupted run keeps what it measured
    print(json.dumps(summarize(rows), indent=1))


def _write(rows: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    OUT.write_text(json.dumps({
        "benchmark": "coverage_matrix", "rule": __doc__.split("The rule, fixed before any result was seen:")[1]
        .split("    python")[0].strip(),
        "settings": f"random-init models; {N_CALIBRATION} calibration samples (Fashion-MNIST train images resized, "
                    f"or King James bytes), {N_UNSEEN} unseen (test split); global L1 0.7 over Linear/Conv, "
                    "torch.ao WeightNormSparsifier 2:4 on Linear, Torch-Pruning MetaPruner 0.3 (L2 magnitude) "
                    "through starfish.attach; every heal with HealConfig() defaults",
        "summary": summarize(rows), "hardware": machine, "rows": rows,
    }, indent=1))


if __name__ == "__main__":
    run(sys.argv[2:] if sys.argv[1:2] == ["run"] else [])
