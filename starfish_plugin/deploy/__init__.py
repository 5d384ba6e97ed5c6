"""Healed models prepared for inference on sparse kernels (2:4 semi-structured packing)."""
