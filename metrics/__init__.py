"""Metrics sidecar (step records -> MLflow). Arrives with the metrics issue."""
