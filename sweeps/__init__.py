"""Optuna studies around experiments.run: `python -m sweeps.run sweep=NAME` (docs/sweeps.md)."""
