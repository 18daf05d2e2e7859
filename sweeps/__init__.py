"""Optuna studies around experiments.run (issue 5: not built yet)."""
