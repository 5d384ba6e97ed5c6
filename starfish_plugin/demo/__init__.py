"""The offline demo: shipped checkpoints with their metadata, the models they hold, demo datasets."""
