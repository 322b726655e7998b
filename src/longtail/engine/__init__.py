"""The training engine: knows loops, schedules and checkpoints, never a paper."""
