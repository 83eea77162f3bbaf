"""Runtime: distributed execution of a compiled plan (expert, tensor, data and pipeline parallelism)."""
