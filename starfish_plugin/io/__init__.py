"""Model files: building models by name, loading pruned and dense files, the weights-only
structured format for physically pruned models."""
