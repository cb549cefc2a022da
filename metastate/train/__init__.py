"""Training (PyTorch, any device): data.py and config.py (no torch: `metastate prepare-data`
runs without it, so nothing is imported here), checkpoints.py, dist.py, loop.py (the Trainer), plot.py."""
