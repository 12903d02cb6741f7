"""The training library of cpt, expand, sft and rl: data streams, loop, checkpoints, DDP, RL algorithms."""
