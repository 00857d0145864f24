"""The training loop and everything a step needs: the step itself, precision, chunking, scale-out, checkpoints
and the run directory."""
