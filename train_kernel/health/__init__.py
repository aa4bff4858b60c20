"""Training health: alerts, hang watchdog, loss-spike and non-finite-streak rollback, stragglers,
profiling and fault injection. Each module has one job; the training loop wires them together."""
