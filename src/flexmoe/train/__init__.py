"""`flexmoe train`: the GPT-MoE training run (data, loop, checkpoints, metrics, CLI)."""
