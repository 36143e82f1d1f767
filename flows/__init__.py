"""Prefect flows: the pipeline, its schedule, and fan-out of per-object work."""
