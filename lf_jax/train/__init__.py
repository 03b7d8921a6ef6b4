"""The trainer shared by every model family: state, steps, accumulation, checkpoints, loop."""
