"""Bad input: a clear error naming the problem, and nothing modified."""

import copy

import pytest
import torch
from helpers import assert_state_equal, l1_prune_, state_copy, tiny_vit
from torch import nn

import starfish_plugin as starfish
from starfish_plugin import errors


@pytest.fixture
def guard(pruned, dense):
    """Snapshots both models; afterwards asserts neither changed."""
    saved = (state_copy(pruned), state_copy(dense))
    yield
    assert_state_equal(pruned, saved[0])
    assert_state_equal(dense, saved[1])


def test_different_architectures(pruned, images, fast, guard):
    other = tiny_vit(depth=3)
    with pytest.raises(errors.ModelMismatchError, match="different architectures.*blocks.2"):
        starfish.heal(pruned, other, images, fast)


def test_different_widths(pruned, images, fast, guard):
    from timm.models.vision_transformer import VisionTransformer

    other = VisionTransformer(img_size=8, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2,
                              num_heads=2, mlp_ratio=4.0)
    with pytest.raises(errors.ModelMismatchError, match="blocks.0.mlp.fc1.weight.*shape"):
        starfish.heal(pruned, other, images, fast)


def test_no_mask_lists_supported_forms(dense, images, fast):
    unpruned = copy.deepcopy(dense)
    saved = state_copy(unpruned)
    with pytest.raises(errors.MaskNotFoundError, match="(?s)torch.nn.utils.prune.*parametrization masks"):
        starfish.heal(unpruned, dense, images, fast)
    assert_state_equal(unpruned, saved)


def test_same_object_or_shared_weights(pruned, images, fast):
    with pytest.raises(errors.ModelMismatchError, match="same object"):
        starfish.heal(pruned, pruned, images, fast)
    shallow = copy.copy(pruned)
    with pytest.raises(errors.ModelMismatchError, match="shares storage"):
        starfish.heal(pruned, shallow, images, fast)


@pytest.mark.parametrize(
    "calibration, error, pattern",
    [
        (torch.empty(0, 1, 8, 8), errors.CalibrationError, "empty"),
        ([], errors.CalibrationError, "empty"),
        (torch.randn(4, 1, 6, 6), errors.CalibrationError, r"cannot take calibration batches of shape \(\d, 1, 6, 6\)"),
        ([torch.randn(4, 1, 8, 8), torch.randn(4, 1, 6, 6)], errors.CalibrationError, "batch 1 has per-sample shape"),
        (torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8), errors.CalibrationTypeError, "dtype torch.uint8"),
        (torch.randn(4, 1, 8, 8, dtype=torch.float64), errors.CalibrationTypeError, "convert the inputs"),
        (torch.full((4, 1, 8, 8), float("nan")), errors.CalibrationError, "NaN or Inf"),
        ("images/", errors.CalibrationTypeError, "pass a Dataset"),
        ([{"x": 1}], errors.CalibrationError, r"batch 0 has input 'x' of shape \(\)"),
        ([{1, 2}], errors.CalibrationTypeError, "batch 0 is a set"),
        (torch.randn(8), errors.CalibrationError, "batch dimension"),
    ],
    ids=["empty-tensor", "empty-list", "wrong-shape", "mixed-shapes", "uint8", "float64", "nan", "string",
         "dict-scalar", "set-batch", "no-batch-dim"],
)
def test_bad_calibration(pruned, dense, fast, guard, calibration, error, pattern):
    with pytest.raises(error, match=pattern):
        starfish.heal(pruned, dense, calibration, fast)


def test_nan_in_dense_outputs(pruned, dense, images, fast):
    broken = copy.deepcopy(dense)
    with torch.no_grad():
        broken.blocks[1].mlp.fc2.bias[0] = float("inf")
    saved = state_copy(pruned)
    with pytest.raises(errors.NonFiniteError, match="dense model's block 'blocks.1'"):
        starfish.heal(pruned, broken, images, fast)
    assert_state_equal(pruned, saved)


def test_block_names_that_do_not_exist(pruned, dense, images, fast, guard):
    with pytest.raises(errors.BlockError, match="'blocks.7' does not exist in the dense model"):
        starfish.heal(pruned, dense, images, fast, blocks=["blocks.0", "blocks.7"])
    with pytest.raises(errors.BlockError, match="predicate matched no module"):
        starfish.heal(pruned, dense, images, fast, blocks=lambda n, m: False)


def test_block_that_never_runs(dense, images, fast):
    dense = copy.deepcopy(dense)
    dense.unused = nn.Linear(2, 2)
    pruned = l1_prune_(copy.deepcopy(dense))
    saved = state_copy(pruned)
    with pytest.raises(errors.BlockError, match=r"\['unused'\] of the dense model exist but are not called"):
        starfish.heal(pruned, dense, images, fast, blocks=["blocks.0", "unused"])
    assert_state_equal(pruned, saved)


def test_labels_out_of_range_or_not_indices(pruned, dense, images, fast, guard):
    too_big = torch.full((64,), 7)
    with pytest.raises(errors.CalibrationError, match=r"labels span 7..7 but the model has 5 classes"):
        starfish.heal(pruned, dense, list(zip(images.split(16), too_big.split(16))), fast, loss="ce")
    one_hot = torch.nn.functional.one_hot(torch.zeros(64, dtype=torch.long), 5)
    with pytest.raises(errors.CalibrationError, match="labels must be class indices"):
        starfish.heal(pruned, dense, list(zip(images.split(16), one_hot.split(16))), fast, loss="ce")
    with pytest.raises(errors.CalibrationTypeError, match="labels must be class indices"):
        starfish.heal(pruned, dense, torch.utils.data.TensorDataset(images, one_hot), fast, loss="ce")


def test_config_is_frozen_and_a_forced_edit_is_still_checked(pruned, dense, images, fast, guard):
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'lr'"):
        fast.lr = -1.0
    object.__setattr__(fast, "lr", -1.0)  # forced past the freeze: heal validates again
    with pytest.raises(errors.ConfigError, match="lr must be a finite number > 0"):
        starfish.heal(pruned, dense, images, fast)


def test_ce_without_labels(pruned, dense, images, fast, guard):
    with pytest.raises(errors.CalibrationError, match="'ce' needs labels"):
        starfish.heal(pruned, dense, images, fast, loss="ce")


def test_mask_shape_mismatch(dense, images, fast):
    pruned = l1_prune_(copy.deepcopy(dense))
    fc1 = pruned.blocks[0].mlp.fc1
    # e.g. a corrupted checkpoint: it broadcasts in forward, but it is not the weight's shape
    fc1.weight_mask = torch.ones(fc1.weight.shape[0], 1)
    saved = state_copy(pruned)
    shape = r"mask of blocks.0.mlp.fc1.weight \(prune_hook\) has shape \(64, 1\)"
    with pytest.raises(errors.MaskShapeError, match=shape):
        starfish.heal(pruned, dense, images, fast)
    assert_state_equal(pruned, saved)


def test_models_on_different_devices(pruned, dense, images, fast, guard):
    meta_dense = copy.deepcopy(dense).to("meta")
    with pytest.raises(errors.ModelMismatchError, match="pruned model is on cpu but the dense model on meta"):
        starfish.heal(pruned, meta_dense, images, fast)
    with pytest.raises(errors.ConfigError, match="models are on cpu"):
        starfish.heal(pruned, dense, images, fast, device="meta")


@pytest.mark.parametrize(
    "field, value",
    [
        ("epochs", 0),
        ("epochs", -1),
        ("lr", 0.0),
        ("lr", -1e-3),
        ("batch_size", 0),
        ("batch_size", 2.5),
        ("loss", "hinge"),
        ("targets", "ssd"),
        ("min_lr", 1.0),
        ("block_weighting", "random"),
        ("trainable", "some"),
    ],
)
def test_bad_config_values(pruned, dense, images, guard, field, value):
    with pytest.raises(errors.ConfigError, match=field if field != "loss" else "unknown loss term"):
        starfish.heal(pruned, dense, images, **{field: value})
    with pytest.raises(errors.ConfigError, match=field if field != "loss" else "unknown loss term"):
        starfish.HealConfig(**{field: value})


def test_unknown_override(pruned, dense, images, guard):
    with pytest.raises(errors.ConfigError, match="unknown HealConfig field.*epoch_count"):
        starfish.heal(pruned, dense, images, epoch_count=3)


def test_errors_are_value_or_type_errors():
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.StarfishError) and cls is not errors.StarfishError:
            assert issubclass(cls, (ValueError, TypeError)), cls


def test_divergence_restores_the_weights(pruned, dense, images):
    saved = state_copy(pruned)
    with pytest.raises(errors.NonFiniteError, match="Lower HealConfig.lr"):
        starfish.heal(pruned, dense, images, lr=1e30, min_lr=1e29, epochs=1, batch_size=16, quiet=True,
                      if_worse="warn")
    assert_state_equal(pruned, saved)
    with pytest.warns(errors.HealingWarning, match="healing diverged.*Lower HealConfig.lr"):  # the default
        report = starfish.heal(pruned, dense, images, lr=1e30, min_lr=1e29, epochs=1, batch_size=16, quiet=True)
    assert_state_equal(pruned, saved)
    assert report.worse_restored and report.diverged_in_epoch == 1


def test_a_failed_heal_in_train_mode_restores_batch_norm_statistics_too():
    """train_mode=True lets batch norm update its running statistics during healing; a heal that
    fails part-way puts them back with the weights."""
    import torchvision

    torch.manual_seed(0)
    dense = torchvision.models.resnet18(num_classes=10).eval()
    pruned = copy.deepcopy(dense)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.5)
    saved = state_copy(pruned)
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # 16 train, 16 held out

    class StopAtStep3:
        @starfish.hookimpl
        def starfish_step_ended(self, step, total_steps, config):
            if step == 3:
                raise KeyboardInterrupt  # as Ctrl-C would, after two steps changed the statistics

    starfish.plugin_manager().register(StopAtStep3())
    with pytest.raises(KeyboardInterrupt):
        starfish.heal(pruned, dense, images, epochs=2, batch_size=8, train_mode=True, quiet=True,
                      diagnostic_samples=0)
    assert_state_equal(pruned, saved)  # running_mean / running_var / num_batches_tracked included


def test_dense_in_another_dtype_is_refused(pruned, dense, images, fast, guard):
    with pytest.raises(errors.ModelMismatchError, match=r"pruned model's weights are torch.float32 but the dense "
                       r"model's are torch.float64"):
        starfish.heal(pruned, copy.deepcopy(dense).double(), images, fast)


def test_calibration_on_the_meta_device_is_refused(pruned, dense, fast, guard):
    with pytest.raises(errors.CalibrationError, match="on the 'meta' device: it has a shape but no values"):
        starfish.heal(pruned, dense, torch.randn(64, 1, 8, 8, device="meta"), fast)


def test_calibration_shapes_users_bring_work_or_name_the_fix(pruned, dense, images, labels, fast, guard):
    report = starfish.heal(l1_prune_(copy.deepcopy(dense)), dense, (images, labels), fast, loss="ce")
    assert report.calibration_source == "(inputs, labels) pair" and report.n_samples + report.held_out_samples == 64
    with pytest.raises(errors.CalibrationError, match=r"read as a sequence of batches.*torch.stack\(items\)"):
        starfish.heal(pruned, dense, list(images), fast)  # single [C, H, W] images in a list
    with pytest.raises(errors.MaskNotFoundError, match="starfish_plugin.adapters.nm_layouts.infer_masks_from_zeros"):
        starfish.heal(copy.deepcopy(dense), dense, images, fast)
