"""The healing core: orchestration, training loop, losses, mask types, block discovery and capture,
alignment of dense targets, warm start, validation. It knows no pruning toolkit."""
