"""Architectures of the coverage matrix: timm, torchvision and Hugging Face ``transformers`` models,
built small (random init, no hub) with the calibration inputs each takes, and three real toolkits
to prune them with."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import timm
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

IMAGE = 32
VOCAB, SEQ = 128, 12


@dataclass
class Arch:
    """One architecture: how to build it, what it eats, and which modules a pruner leaves alone."""

    name: str
    build: Callable[[], nn.Module]
    text: bool = False
    keep: Callable[[nn.Module], list[nn.Module]] = field(default=lambda m: [])  # heads, embeddings
    tp_kwargs: Callable[[nn.Module], dict] = field(default=lambda m: {})

    def calibration(self, n: int, seed: int = 0) -> object:
        g = torch.Generator().manual_seed(seed)
        if self.text:
            ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
            mask = torch.ones(n, SEQ, dtype=torch.long)
            mask[n // 2 :, -3:] = 0  # some padded sequences
            return {"input_ids": ids, "attention_mask": mask}
        return torch.randn(n, 3, IMAGE, IMAGE, generator=g)


def _last_linear(model: nn.Module) -> list[nn.Module]:
    return [[m for m in model.modules() if isinstance(m, nn.Linear)][-1]]


def _hf(config_cls: str, model_cls: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**kwargs)
        return getattr(transformers, model_cls)(config)

    return build


def _mlp_hidden_only(model: nn.Module) -> list[nn.Module]:
    """Everything but the first MLP layer of each block: Torch-Pruning then removes MLP hidden
    units only, the setting its examples use for window attention (Swin), whose relative-position
    tables and head counts it does not follow."""
    return [m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))
            and not name.endswith(("fc1", "mlp.0", "intermediate.dense", "gate_proj", "up_proj"))]


def _hf_keep(model: nn.Module) -> list[nn.Module]:
    """A Hugging Face model's embeddings and its output layer (classifier or LM head)."""
    return [m for m in model.modules() if isinstance(m, nn.Embedding)] + _last_linear(model)


def _hf_heads(model: nn.Module) -> dict:
    """``num_heads`` for every attention's query/key/value projections, as Torch-Pruning's examples
    give it; starfish then updates the head size (``head_dim`` / ``attention_head_size``)."""
    heads = {}
    for m in model.modules():
        for q, k, v in (("q_proj", "k_proj", "v_proj"), ("query", "key", "value")):
            if isinstance(getattr(m, q, None), nn.Linear):
                n = getattr(m, "num_attention_heads", None) or m.config.num_attention_heads
                heads.update({getattr(m, q): n, getattr(m, k): n, getattr(m, v): n})
    return {"num_heads": heads}


def _hf_whole_heads(model: nn.Module) -> dict:
    """Rotary position embeddings fix the head size: prune whole heads (Torch-Pruning's LLM setting)."""
    return {**_hf_heads(model), "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": 0.5}


def _timm_heads(model: nn.Module) -> dict:
    return {"num_heads": {m.qkv: m.num_heads for m in model.modules() if isinstance(m, timm.layers.Attention)}}


def _tv_vit_heads(model: nn.Module) -> dict:
    return {"num_heads": {m: m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)}}


def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=10, **kwargs)

    return build


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn()

    return build


def _vgg11_bn() -> nn.Module:
    """torchvision's VGG-11 with batch norm at 1/8 width (its classifier narrowed to match)."""
    from torchvision.models.vgg import VGG, make_layers

    features = make_layers([8, "M", 16, "M", 32, 32, "M", 64, 64, "M", 64, 64, "M"], batch_norm=True)
    with torch.device("meta"):  # VGG always builds its 512-wide classifier first: skip that cost
        model = VGG(nn.Sequential(), num_classes=10, init_weights=False)
    model.features = features
    model.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    model.classifier = nn.Sequential(nn.Linear(64 * 7 * 7, 64), nn.ReLU(True), nn.Linear(64, 10))
    return model


def _timm_regnet() -> nn.Module:
    from timm.models.regnet import RegNet, RegNetCfg

    return RegNet(RegNetCfg(depth=6, w0=8, wa=8.0, wm=2.0, group_size=8), num_classes=10)


def _tv_regnet() -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    return RegNet(BlockParams.from_init_params(depth=6, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25),
                  num_classes=10)


def _mixer() -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=IMAGE, patch_size=8, num_blocks=2, embed_dim=32)


def _poolformer() -> nn.Module:
    from timm.models import metaformer

    return metaformer.MetaFormer(depths=(1, 1, 2, 1), dims=(8, 16, 32, 64), token_mixers=metaformer.Pooling,
                                 norm_layers=metaformer.GroupNorm1, num_classes=10)


def _pvt() -> nn.Module:
    from timm.models.pvt_v2 import PyramidVisionTransformerV2

    return PyramidVisionTransformerV2(depths=(1, 1, 2, 1), embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 2, 2),
                                      num_classes=10)


def _tv_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=[4, 4],
                           num_classes=10)


def _tv_convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 2)], num_classes=10)


def _tv_resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


ARCHS: list[Arch] = [
    # timm
    Arch("timm_vit", _timm("vit_tiny_patch16_224", img_size=IMAGE, patch_size=8, depth=2, embed_dim=32,
                           num_heads=2), keep=_last_linear, tp_kwargs=_timm_heads),
    Arch("timm_swin", _timm("swin_tiny_patch4_window7_224", img_size=IMAGE, window_size=4, embed_dim=16,
                            depths=(2, 2), num_heads=(1, 2)), keep=_mlp_hidden_only),
    Arch("timm_convnext", _timm("convnext_atto", depths=(1, 1, 2, 1), dims=(8, 16, 32, 64)), keep=_last_linear),
    Arch("timm_resnet", _timm("test_resnet"), keep=_last_linear),
    Arch("timm_efficientnet", _timm("test_efficientnet"), keep=_last_linear),
    Arch("timm_mobilenetv3", _timm("mobilenetv3_small_050"), keep=_last_linear),
    Arch("timm_regnet", _seeded(_timm_regnet), keep=_last_linear),
    Arch("timm_mixer", _seeded(_mixer), keep=_last_linear),
    Arch("timm_poolformer", _seeded(_poolformer), keep=_last_linear),
    Arch("timm_pvt_v2", _seeded(_pvt), keep=_last_linear),
    # torchvision
    Arch("tv_resnet", _seeded(_tv_resnet), keep=_last_linear),
    Arch("tv_mobilenet_v3_small", _seeded(lambda: torchvision.models.mobilenet_v3_small(num_classes=10,
                                                                                       width_mult=0.25)),
         keep=_last_linear),
    Arch("tv_regnet", _seeded(_tv_regnet), keep=_last_linear),
    Arch("tv_shufflenet_v2", _seeded(lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10)),
         keep=_last_linear),
    Arch("tv_densenet", _seeded(lambda: torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2),
                                                                    num_init_features=16, num_classes=10)),
         keep=_last_linear),
    Arch("tv_vgg11_bn", _seeded(_vgg11_bn), keep=_last_linear),
    Arch("tv_swin", _seeded(_tv_swin), keep=_mlp_hidden_only),
    Arch("tv_vit", _seeded(lambda: torchvision.models.VisionTransformer(
        image_size=IMAGE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)),
        keep=_last_linear, tp_kwargs=_tv_vit_heads),
    Arch("tv_convnext", _seeded(_tv_convnext), keep=_last_linear),
    # Hugging Face transformers (vision and text)
    Arch("hf_vit", _hf("ViTConfig", "ViTForImageClassification", hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, image_size=IMAGE, patch_size=8, num_labels=10),
         keep=_hf_keep, tp_kwargs=_hf_heads),
    Arch("hf_swin", _hf("SwinConfig", "SwinForImageClassification", image_size=IMAGE, patch_size=4, embed_dim=16,
                        depths=[2, 2], num_heads=[1, 2], window_size=4, num_labels=10), keep=_mlp_hidden_only),
    Arch("hf_convnext", _hf("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[8, 16, 32, 64],
                            depths=[1, 1, 2, 1], num_labels=10), keep=_last_linear),
    Arch("hf_bert", _hf("BertConfig", "BertForSequenceClassification", vocab_size=VOCAB, hidden_size=32,
                        num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=3),
         text=True, keep=_hf_keep, tp_kwargs=_hf_heads),
    Arch("hf_llama", _hf("LlamaConfig", "LlamaForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64, use_cache=False),
         text=True, keep=_hf_keep, tp_kwargs=_hf_whole_heads),
    Arch("hf_gpt2", _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                        n_positions=SEQ, bos_token_id=0, eos_token_id=0, use_cache=False),
         text=True, keep=_hf_keep),
]


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear and Conv2d layers (and Hugging Face's ``Conv1D``, GPT-2's linear layer) whose weight
    is their own: a weight tied to another module (an LM head tied to the embedding) is left alone."""
    from transformers.pytorch_utils import Conv1D

    counts: dict[int, int] = {}
    for m in model.modules():
        if isinstance(getattr(m, "weight", None), torch.Tensor):
            counts[id(m.weight)] = counts.get(id(m.weight), 0) + 1
    return [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, Conv1D)) and counts[id(m.weight)] == 1
    ]


def prune_global_l1(model: nn.Module, amount: float = 0.7) -> nn.Module:
    """``torch.nn.utils.prune.global_unstructured``, L1, over every Linear/Conv weight."""
    prune.global_unstructured(
        [(m, "weight") for _, m in _weight_layers(model)], pruning_method=prune.L1Unstructured, amount=amount
    )
    return model


def sparsify_2_4(model: nn.Module):
    """torch.ao ``WeightNormSparsifier`` 2:4 on every Linear (and Conv1D) layer whose rows split into
    groups of four; returns the sparsifier (the masks live in its parametrizations)."""
    from torch.ao.pruning import WeightNormSparsifier
    from transformers.pytorch_utils import Conv1D

    layers = [
        name for name, m in _weight_layers(model)
        if isinstance(m, (nn.Linear, Conv1D)) and m.weight.shape[-1] % 4 == 0
    ]
    sparsifier = WeightNormSparsifier(sparsity_level=1.0, sparse_block_shape=(1, 4), zeros_per_block=2)
    sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name in layers])
    sparsifier.step()
    return sparsifier


def example_batch(arch: Arch, calibration: object) -> object:
    if isinstance(calibration, dict):
        return {k: v[:2] for k, v in calibration.items()}
    return calibration[:2]


TOOLKITS = ("global_l1", "ao_2_4", "torch_pruning")


def heal_config():
    import starfish_plugin as starfish

    return starfish.HealConfig(epochs=2, batch_size=8, lr=1e-3, quiet=True, diagnostic_samples=32)


def toolkit_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks as the toolkit itself holds them (prune buffers or parametrization masks)."""
    masks = {}
    for name, module in model.named_modules():
        if hasattr(module, "weight_mask"):
            masks[name] = module.weight_mask.detach().clone()
        parametrizations = getattr(module, "parametrizations", None)
        if parametrizations is not None and "weight" in parametrizations:
            masks[name] = parametrizations.weight[0].mask.detach().clone()
    return masks


def run_case(arch: Arch, toolkit: str, dense: nn.Module, n: int = 32):
    """Prune a copy of ``dense`` (an ``arch``) with ``toolkit`` and heal it with default discovery.

    Returns ``(report, masks_before, masks_after)``; Torch-Pruning heals through
    ``starfish.attach`` (its masks are the shapes themselves, so none are returned).
    """
    import torch_pruning as tp

    import starfish_plugin as starfish

    model = copy.deepcopy(dense)
    calibration = arch.calibration(n)
    if toolkit == "torch_pruning":
        pruner = tp.pruner.MetaPruner(
            model, example_batch(arch, calibration), importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=0.3, ignored_layers=arch.keep(model), **arch.tp_kwargs(model),
        )
        handle = starfish.attach(pruner, dense, calibration, heal_config())
        pruner.step()
        if not handle.reports:
            raise AssertionError("attach healed nothing after the step")
        return handle.reports[-1], {}, {}
    if toolkit == "global_l1":
        prune_global_l1(model)
    else:
        sparsify_2_4(model)
    before = toolkit_masks(model)
    report = starfish.heal(model, dense, calibration, heal_config())
    return report, before, toolkit_masks(model)
