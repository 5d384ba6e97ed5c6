"""Calibration inputs (in memory or on disk) and dense targets (in memory, on disk or online)."""
