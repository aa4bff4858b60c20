"""Checkpoints of a training run: what a folder holds (layout, manifest), writing one from every
rank (locally, to a store, or through the uploader), finding the newest complete one, and loading
it back, re-partitioned when the data-parallel size changed."""
