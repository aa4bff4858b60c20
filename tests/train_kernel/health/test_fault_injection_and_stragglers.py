"""Fault injection fires each fault once and only on its rank; stragglers are named by ratio."""

from __future__ import annotations

import logging
import threading

import pytest

from train_kernel.health.fault_injection import SPIKE_FACTOR, FaultInjector, InjectedFault
from train_kernel.health.stragglers import describe, find_stragglers


def test_each_fault_fires_once(caplog):
    faults = FaultInjector(rank=0, nonfinite_grad_at_steps=[2, 3], loss_spike_at_steps=[4], raise_at_step=5)
    with caplog.at_level(logging.WARNING):
        faults.announce()
    assert "FAULT INJECTION ON" in caplog.text and "non-finite gradients at steps [2, 3]" in caplog.text
    assert [faults.nonfinite_grad(s) for s in (1, 2, 2, 3, 3)] == [False, True, False, True, False]
    assert faults.spike(4, 2.0) == 2.0 * SPIKE_FACTOR and faults.spike(4, 2.0) == 2.0
    faults.before_step(4)
    with pytest.raises(InjectedFault, match="raise_at_step=5"):
        faults.before_step(5)
    faults.before_step(5)  # replayed after a rollback: no second time


def test_off_by_default_and_silent(caplog):
    faults = FaultInjector(rank=0)
    with caplog.at_level(logging.WARNING):
        faults.announce()
    assert not faults.active and caplog.text == ""


def test_hang_only_on_its_rank():
    FaultInjector(rank=0, hang_at_step=1, hang_rank=1).before_step(1)  # returns: not this rank
    hung = FaultInjector(rank=1, hang_at_step=1, hang_rank=1)
    thread = threading.Thread(target=hung.before_step, args=(1,), daemon=True)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive()


def test_stragglers():
    times = [1.0, 1.05, 0.98, 2.5]
    assert find_stragglers(times, 1.5) == [3]
    assert find_stragglers(times, 3.0) == [] and find_stragglers([9.0], 1.1) == []
    assert "rank 3 (n2) 2.500 s" in describe(times, [3], ["n0", "n0", "n1", "n2"])
