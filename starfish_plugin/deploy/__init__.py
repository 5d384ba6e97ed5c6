"""Healed models prepared for inference: per-layer sparse kernel selection (CSR, BSR, compact,
2:4 semi-structured), weights-only files of the result, and 2:4 packing."""

from starfish_plugin.deploy.files import load_for_inference, save_for_inference
from starfish_plugin.deploy.report import InferenceReport, LayerChoice
from starfish_plugin.deploy.selection import sparsify_for_inference

__all__ = ["InferenceReport", "LayerChoice", "load_for_inference", "save_for_inference", "sparsify_for_inference"]
