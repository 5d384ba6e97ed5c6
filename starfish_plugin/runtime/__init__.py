"""How a heal runs: resume checkpoints, fingerprints of inputs and models, torchrun."""
