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
    image: int = IMAGE  # side of the square calibration images (vision models only)

    def calibration(self, n: int, seed: int = 0) -> object:
        g = torch.Generator().manual_seed(seed)
        if self.text:
            ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
            mask = torch.ones(n, SEQ, dtype=torch.long)
            mask[n // 2 :, -3:] = 0  # some padded sequences
            return {"input_ids": ids, "attention_mask": mask}
        return torch.randn(n, 3, self.image, self.image, generator=g)


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


# More architecture families, built as small. Each of these runs on 32 x 32 images (``Arch.image`` is
# for a family that needs more); Torch-Pruning 1.6.1 cannot prune several of them as configured.


def _last_layer(model: nn.Module) -> list[nn.Module]:
    """The output layer, a Linear or (SqueezeNet's) a 1x1 Conv2d."""
    return [[m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]]


def _branch_heads(model: nn.Module) -> list[nn.Module]:
    """CrossViT's two classifier heads, one per branch (their logits are averaged)."""
    return list(model.head)


def _hidden_only(*suffixes: str) -> Callable[[nn.Module], list[nn.Module]]:
    """Like ``_mlp_hidden_only``, for MLPs whose first layer is named otherwise."""
    def keep(model: nn.Module) -> list[nn.Module]:
        return [m for name, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d)) and not name.endswith(suffixes)]

    return keep


def _qkv_heads(model: nn.Module) -> dict:
    """``num_heads`` for every attention with a fused ``qkv`` Linear (timm's and its families' own)."""
    return {"num_heads": {m.qkv: m.num_heads for m in model.modules()
                          if isinstance(getattr(m, "qkv", None), nn.Linear)
                          and isinstance(getattr(m, "num_heads", None), int)}}


def _hf_fused_whole_heads(model: nn.Module) -> dict:
    """Fused query/key/value projections (Phi-3's ``qkv_proj``, GPT-NeoX's ``query_key_value``) with
    rotary embeddings: whole heads, as ``_hf_whole_heads``."""
    heads = {}
    for m in model.modules():
        for qkv in ("qkv_proj", "query_key_value"):
            if isinstance(getattr(m, qkv, None), nn.Linear):
                heads[getattr(m, qkv)] = m.config.num_attention_heads
    return {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": 0.5}


def _timm_mobilevit() -> nn.Module:
    from timm.models.byobnet import ByobNet, ByoModelCfg
    from timm.models.mobilevit import _inverted_residual_block, _mobilevit_block

    return ByobNet(ByoModelCfg(
        blocks=(
            _inverted_residual_block(d=1, c=8, s=1, br=2.0),
            _inverted_residual_block(d=1, c=16, s=2, br=2.0),
            _mobilevit_block(d=1, c=24, s=2, transformer_dim=32, transformer_depth=1, patch_size=2, br=2.0),
            _mobilevit_block(d=1, c=32, s=2, transformer_dim=32, transformer_depth=1, patch_size=2, br=2.0),
        ),
        stem_chs=8, stem_type="3x3", stem_pool="", downsample="", act_layer="silu", num_features=64,
    ), num_classes=10)


def _levit() -> nn.Module:
    from timm.models.levit import Levit

    return Levit(img_size=IMAGE, embed_dim=(16, 24, 32), key_dim=8, depth=(1, 1, 1), num_heads=(1, 2, 2),
                 num_classes=10)


def _efficientformer_v2() -> nn.Module:
    from timm.models.efficientformer_v2 import EfficientFormerV2

    return EfficientFormerV2(depths=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), num_vit=1, img_size=IMAGE,
                             distillation=False, num_classes=10)


def _edgenext() -> nn.Module:
    from timm.models.edgenext import EdgeNeXt

    return EdgeNeXt(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), heads=(1, 1, 2, 2), num_classes=10)


def _convit() -> nn.Module:
    from timm.models.convit import ConVit

    return ConVit(img_size=IMAGE, patch_size=8, embed_dim=32, depth=2, num_heads=2, local_up_to_layer=1,
                  num_classes=10)


def _tv_maxvit() -> nn.Module:
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(IMAGE, IMAGE), stem_channels=8, partition_size=2, block_channels=[16, 32],
                  block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10)


def _repvgg() -> nn.Module:
    from timm.models.byobnet import ByoBlockCfg, ByobNet, ByoModelCfg

    blocks = tuple(ByoBlockCfg(type="rep", d=1, c=c) for c in (8, 16, 32, 64))
    return ByobNet(ByoModelCfg(blocks=blocks, stem_type="rep", stem_chs=8), num_classes=10)


def _mobileone() -> nn.Module:
    from timm.models.byobnet import ByobNet, ByoModelCfg, _mobileone_bcfg

    blocks = _mobileone_bcfg(d=(1, 1, 1, 1), wf=(0.125,) * 4, num_conv_branches=2)  # widths 8, 16, 32, 64
    return ByobNet(ByoModelCfg(blocks=blocks, stem_type="one", stem_chs=8), num_classes=10)


def _repvit() -> nn.Module:
    from timm.models.repvit import RepVit

    return RepVit(img_size=IMAGE, embed_dim=(8, 16, 32, 64), depth=(1, 1, 1, 1), distillation=False, num_classes=10)


def _fastvit() -> nn.Module:
    from functools import partial

    from timm.models.fastvit import FastVit, RepConditionalPosEnc

    return FastVit(layers=(1, 1, 1, 1), embed_dims=(8, 16, 32, 64), mlp_ratios=(2,) * 4,
                   token_mixers=("repmixer", "repmixer", "repmixer", "attention"),
                   pos_embs=(None, None, None, partial(RepConditionalPosEnc, spatial_shape=(7, 7))), num_classes=10)


def _twins_svt() -> nn.Module:
    from timm.models.twins import Twins

    return Twins(img_size=IMAGE, embed_dims=(8, 16, 32, 64), num_heads=(1, 1, 2, 2), mlp_ratios=(2,) * 4,
                 depths=(2, 2, 2, 1), sr_ratios=(4, 2, 1, 1), wss=(4, 2, 2, 1), num_classes=10)


def _focalnet() -> nn.Module:
    from timm.models.focalnet import FocalNet

    return FocalNet(embed_dim=8, depths=(1, 1, 1, 1), drop_path_rate=0.0, num_classes=10)


def _crossvit() -> nn.Module:
    from timm.models.crossvit import CrossVit

    return CrossVit(img_size=IMAGE, patch_size=(8, 16), embed_dim=(16, 32), depth=((1, 1, 0),), num_heads=(1, 2),
                    mlp_ratio=(2.0, 2.0, 1.0), num_classes=10)


def _mvitv2() -> nn.Module:
    from timm.models.mvitv2 import MultiScaleVit, MultiScaleVitCfg

    return MultiScaleVit(MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=8, num_heads=1), img_size=(IMAGE, IMAGE),
                         num_classes=10)


def _nest() -> nn.Module:
    from timm.models.nest import Nest

    return Nest(img_size=IMAGE, patch_size=4, embed_dims=(16, 32, 64), num_heads=(1, 2, 2), depths=(1, 1, 1),
                num_classes=10)


def _tv_efficientnet_v2() -> nn.Module:
    from functools import partial

    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    setting = [
        FusedMBConvConfig(1, 3, 1, 8, 8, 1),
        FusedMBConvConfig(4, 3, 2, 8, 16, 1),
        MBConvConfig(4, 3, 2, 16, 32, 1, width_mult=1.0, depth_mult=1.0),
        MBConvConfig(4, 3, 2, 32, 48, 1, width_mult=1.0, depth_mult=1.0),
    ]
    return EfficientNet(setting, dropout=0.2, num_classes=10, last_channel=128,
                        norm_layer=partial(nn.BatchNorm2d, eps=1e-3))


_TINY_LM = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                use_cache=False)

MORE_ARCHS: list[Arch] = [
    # hybrid convolution-attention
    Arch("timm_coatnet", _timm("test_coatnet", img_size=IMAGE), keep=_mlp_hidden_only),
    Arch("timm_mobilevit", _seeded(_timm_mobilevit), keep=_last_linear, tp_kwargs=_qkv_heads),
    Arch("timm_levit", _seeded(_levit), keep=_last_linear),
    Arch("timm_efficientformer_v2", _seeded(_efficientformer_v2), keep=_last_linear),
    Arch("timm_edgenext", _seeded(_edgenext), keep=_last_linear, tp_kwargs=_qkv_heads),
    Arch("timm_convit", _seeded(_convit), keep=_last_linear, tp_kwargs=_qkv_heads),
    Arch("tv_maxvit", _seeded(_tv_maxvit), keep=_hidden_only("mlp_layer.1")),
    # re-parameterisable (multi-branch for training)
    Arch("timm_repvgg", _seeded(_repvgg), keep=_last_linear),
    Arch("timm_mobileone", _seeded(_mobileone), keep=_last_linear),
    Arch("timm_repvit", _seeded(_repvit), keep=_last_linear),
    Arch("timm_fastvit", _seeded(_fastvit), keep=_last_linear, tp_kwargs=_qkv_heads),
    # multi-scale / hierarchical
    Arch("timm_twins_svt", _seeded(_twins_svt), keep=_last_linear, tp_kwargs=_qkv_heads),
    Arch("timm_focalnet", _seeded(_focalnet), keep=_last_linear),
    Arch("timm_crossvit", _seeded(_crossvit), keep=_branch_heads, tp_kwargs=_qkv_heads),
    Arch("timm_mvitv2", _seeded(_mvitv2), keep=_last_linear, tp_kwargs=_qkv_heads),
    Arch("timm_nest", _seeded(_nest), keep=_last_linear, tp_kwargs=_qkv_heads),
    # torchvision
    Arch("tv_mnasnet", _seeded(lambda: torchvision.models.MNASNet(0.25, num_classes=10)), keep=_last_linear),
    Arch("tv_squeezenet", _seeded(lambda: torchvision.models.squeezenet1_1(num_classes=10)), keep=_last_layer),
    Arch("tv_efficientnet_v2", _seeded(_tv_efficientnet_v2), keep=_last_linear),
    Arch("tv_mobilenet_v2", _seeded(lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25)),
         keep=_last_linear),
    Arch("tv_googlenet", _seeded(lambda: torchvision.models.GoogLeNet(num_classes=10, aux_logits=False,
                                                                      init_weights=True)),
         keep=_last_linear),  # fixed Inception widths: 5.6 M parameters
    # Hugging Face decoder language models
    Arch("hf_qwen2", _hf("Qwen2Config", "Qwen2ForCausalLM", **_TINY_LM, num_key_value_heads=2),
         text=True, keep=_hf_keep, tp_kwargs=_hf_whole_heads),
    Arch("hf_mistral", _hf("MistralConfig", "MistralForCausalLM", **_TINY_LM, num_key_value_heads=2),
         text=True, keep=_hf_keep, tp_kwargs=_hf_whole_heads),
    Arch("hf_gemma", _hf("GemmaConfig", "GemmaForCausalLM", **_TINY_LM, num_key_value_heads=2, head_dim=16),
         text=True, keep=_hf_keep, tp_kwargs=_hf_whole_heads),
    Arch("hf_phi", _hf("PhiConfig", "PhiForCausalLM", **_TINY_LM, num_key_value_heads=2),
         text=True, keep=_hf_keep, tp_kwargs=_hf_whole_heads),
    Arch("hf_phi3", _hf("Phi3Config", "Phi3ForCausalLM", **_TINY_LM, num_key_value_heads=2, bos_token_id=1,
                        eos_token_id=2, pad_token_id=0), text=True, keep=_hf_keep, tp_kwargs=_hf_fused_whole_heads),
    Arch("hf_gpt_neox", _hf("GPTNeoXConfig", "GPTNeoXForCausalLM", **_TINY_LM),
         text=True, keep=_hf_keep, tp_kwargs=_hf_fused_whole_heads),
    Arch("hf_opt", _hf("OPTConfig", "OPTForCausalLM", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64,
                       use_cache=False), text=True, keep=_hf_keep, tp_kwargs=_hf_heads),
    # Hugging Face vision models
    Arch("hf_dinov2", _hf("Dinov2Config", "Dinov2ForImageClassification", hidden_size=32, num_hidden_layers=2,
                          num_attention_heads=2, mlp_ratio=2, image_size=IMAGE, patch_size=8, num_labels=10),
         keep=_hf_keep, tp_kwargs=_hf_heads),
    Arch("hf_mobilevit", _hf("MobileViTConfig", "MobileViTForImageClassification", image_size=IMAGE,
                             hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                             num_attention_heads=2, num_labels=10), keep=_hf_keep, tp_kwargs=_hf_heads),
    Arch("hf_resnet", _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=8,
                          hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], layer_type="basic", num_labels=10),
         keep=_last_linear),
    Arch("hf_convnextv2", _hf("ConvNextV2Config", "ConvNextV2ForImageClassification", hidden_sizes=[8, 16, 32, 64],
                              depths=[1, 1, 2, 1], num_labels=10), keep=_last_linear),
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
