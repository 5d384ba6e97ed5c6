"""starfish-plugin: heal pruned PyTorch models with STARFISH, in the pruning toolkit's own form.

Example:
    >>> import starfish_plugin as starfish
    >>> report = starfish.heal(pruned, dense, calibration_images)
"""

from starfish_plugin.api import find_masks, heal
from starfish_plugin.config import HealConfig
from starfish_plugin.core.blocks import find_blocks
from starfish_plugin.core.evaluate import evaluate
from starfish_plugin.core.plan import SparsityPlan
from starfish_plugin.deploy import InferenceReport, load_for_inference, save_for_inference, sparsify_for_inference
from starfish_plugin.plugins.attach import attach
from starfish_plugin.plugins.hookspecs import hookimpl
from starfish_plugin.plugins.manager import plugin_manager
from starfish_plugin.report import HealReport
from starfish_plugin.serve import export, load_exported

__version__ = "0.1.0"

__all__ = [
    "HealConfig",
    "HealReport",
    "InferenceReport",
    "SparsityPlan",
    "attach",
    "evaluate",
    "export",
    "find_blocks",
    "find_masks",
    "heal",
    "hookimpl",
    "load_for_inference",
    "load_exported",
    "plugin_manager",
    "save_for_inference",
    "sparsify_for_inference",
]
