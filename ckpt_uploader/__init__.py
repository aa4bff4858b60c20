"""Checkpoint uploader: a service fed over ZeroMQ that copies checkpoint folders from a spool to S3
or a folder, verifies them, writes the `<step>.step` marker last and survives its own restarts.

Public modules for other services: ``client`` (UploaderClient), ``embedded`` (a private uploader),
``stores`` (open_store) and ``uri`` (parse_storage_uri)."""
