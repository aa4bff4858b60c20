"""Checkpoint uploader service (ZeroMQ -> S3 / local folder). Arrives with the checkpoint issue."""
