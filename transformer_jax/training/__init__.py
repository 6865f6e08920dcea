"""Training: optimizer, pure train/eval steps, data parallelism, checkpoints, main loop."""
