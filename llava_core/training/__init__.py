"""Stage 4: the training launcher, the loop, its data order, checkpoints and what a run shows."""
