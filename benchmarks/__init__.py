"""Measured speed and memory of the data path, training and inference (`python -m benchmarks.run`)."""
