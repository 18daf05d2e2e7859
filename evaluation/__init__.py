"""The one evaluation every table row goes through: embed, split users, linear probe, downstream MLP, baselines."""
