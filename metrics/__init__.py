"""Metrics: the trainer's step records (metrics.jsonl) and the sidecar that forwards them to MLflow.

- `emitter`: the public contract, what the trainer writes (stdlib only);
- `supervisor`: the trainer's API, start_sidecar / SidecarProcess.stop;
- `sidecar`: the forwarding loop (`python -m metrics.sidecar run ...`), `cli`: `metrics-sidecar`;
- `records`: reading and parsing the file; `mlflow_run`: run identity, progress, retries.
"""
