"""Thin CLIs, one per DVC stage: read the params section, call the library, write, log to MLflow."""
