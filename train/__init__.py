"""fastmae.train: pretraining loop, data loaders, checkpoints, schedules, pictures."""
