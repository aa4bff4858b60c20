"""Metrics: the trainer's step records (metrics.jsonl) and the sidecar that forwards them to MLflow.

- `emitter`: the public contract, what the trainer writes (stdlib only);
- `supervisor`: the trainer's API, start_sidecar / SidecarProcess.stop;
- `sidecar`: the forwarding loop (`python -m metrics.sidecar run ...`), `cli`: `metrics-sidecar`;
- `records`: reading and parsing the file; `mlflow_run`: run identity, progress, retries;
- `run_file`: mlflow_run.json, the MLflow run of each segment (trainer start) of the file;
- `batches`: log_batch requests, and records MLflow refuses (reported and skipped);
- `names`: metric/param/tag names mapped to what MLflow accepts; `redact`: credentials in URIs.
"""
