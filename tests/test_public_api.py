import inspect

import starfish_plugin as starfish

CONTRACT = {
    "heal", "HealConfig", "HealReport", "SparsityPlan", "find_masks", "find_blocks",
    "evaluate", "hookimpl", "plugin_manager", "attach",
    # inference on sparse kernels
    "sparsify_for_inference", "InferenceReport", "save_for_inference", "load_for_inference",
    # serving
    "export", "load_exported",
}


def test_all_resolves_and_matches_the_contract():
    assert set(starfish.__all__) == CONTRACT
    assert callable(starfish.heal) and callable(starfish.find_masks) and callable(starfish.find_blocks)
    assert callable(starfish.evaluate) and callable(starfish.attach) and callable(starfish.plugin_manager)
    assert isinstance(starfish.HealConfig(), starfish.HealConfig) and starfish.HealReport.__dataclass_fields__
    assert "entries" in starfish.SparsityPlan.__dataclass_fields__
    assert callable(starfish.hookimpl) and starfish.hookimpl.project_name == "starfish"


def test_every_error_is_a_starfish_error_exported_from_errors():
    import starfish_plugin.errors as errors

    classes = [c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, Exception) and not issubclass(c, Warning)]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, errors.StarfishError) or cls is errors.StarfishError, cls
        assert cls is errors.StarfishError or issubclass(cls, (ValueError, TypeError, OSError)), cls


def test_heal_signature_matches_design():
    params = inspect.signature(starfish.heal).parameters
    assert list(params)[:4] == ["pruned", "dense", "calibration", "config"]
    assert params["config"].default is None
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_healconfig_defaults_follow_the_paper():
    c = starfish.HealConfig()
    assert (c.epochs, c.lr, c.min_lr, c.batch_size, c.weight_decay) == (10, 6e-4, 1e-6, 32, 0.0)
    assert (c.loss, c.blocks, c.targets, c.device, c.seed) == ("cosine", None, "auto", None, 0)


def test_adapters_install_under_the_package_namespace():
    from starfish_plugin.adapters import torch_masks

    assert torch_masks.__name__ == "starfish_plugin.adapters.torch_masks"
