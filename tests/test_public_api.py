import inspect

import starfish_plugin as starfish

CONTRACT = {
    "heal", "HealConfig", "HealReport", "SparsityPlan", "find_masks", "find_blocks",
    "evaluate", "hookimpl", "plugin_manager", "attach",
}


def test_all_resolves_and_matches_the_contract():
    assert set(starfish.__all__) == CONTRACT
    for name in starfish.__all__:
        assert getattr(starfish, name) is not None


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
