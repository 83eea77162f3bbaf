"""Compile side of the pipeline: tracing, op annotations, cost model, plan search and plans."""
