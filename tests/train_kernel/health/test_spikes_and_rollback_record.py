"""The loss-spike detector, the non-finite streak, and the run folder's rollback record."""

from __future__ import annotations

import json

import pytest

from train_kernel.health.rollback import RollbackLimitError, RollbackRecord
from train_kernel.health.spikes import LossSpikeDetector, SkipStreak


def test_spike_needs_a_full_window_and_consecutive_steps():
    detector = LossSpikeDetector(factor=2.0, window=4, steps=2)
    assert [detector.update(x) for x in (5.0, 100.0, 4.0, 3.0)] == [None] * 4  # window not full yet
    assert detector.update(2.9) is None  # median of 5, 100, 4, 3 is 4.5: not a spike
    # the window is now 100, 4, 3, 2.9 (median 3.5): 20 is a spike; one step alone is not enough
    assert detector.update(20.0) is None
    spike = detector.update(30.0)
    assert spike is not None and spike.steps == 2 and spike.median == pytest.approx(3.5)
    assert "30" in spike.describe()
    # spiking losses never entered the window: the same bar holds
    assert detector.update(8.0) is None and detector.update(8.0) is not None


def test_spike_streak_broken_by_a_normal_step_and_nan_ignored():
    detector = LossSpikeDetector(factor=3.0, window=2, steps=2)
    for loss in (1.0, 1.0, 5.0, 1.0, 5.0, float("nan")):
        assert detector.update(loss) is None
    assert detector.update(5.0) is not None  # nan neither breaks nor extends the streak


def test_detector_refuses_meaningless_settings():
    with pytest.raises(ValueError):
        LossSpikeDetector(factor=1.0, window=3)


def test_skip_streak():
    streak = SkipStreak(3)
    assert [streak.update(s) for s in (True, True, False, True, True, True, True)] == [
        False, False, False, False, False, True, False,
    ]  # fmt: skip
    assert not any(SkipStreak(0).update(True) for _ in range(10))


def test_rollback_record_survives_a_restart_and_enforces_the_limit(tmp_path):
    record = RollbackRecord(tmp_path)
    assert record.skipped_batches() == frozenset()
    record.check_allowed(1, "loss spike", 5)
    first = record.add(
        "loss spike", at_step=12, to_step=10, checkpoint="local:/c/10", first_batch=10, end_batch=13
    )
    assert first.number == 1 and "batches 10..12 skipped" in first.describe()
    again = RollbackRecord(tmp_path)  # as a resumed trainer reads it
    assert again.skipped_batches() == {10, 11, 12}
    with pytest.raises(RollbackLimitError, match=r"health.max_rollbacks = 1.*rollbacks.json"):
        again.check_allowed(1, "8 consecutive non-finite steps", 20)
    again.check_allowed(2, "x", 20)
    again.add("x", 20, 18, "local:/c/18", 19, 21)
    assert RollbackRecord(tmp_path).skipped_batches() == {10, 11, 12, 19, 20}
    assert len(json.loads((tmp_path / "health" / "rollbacks.json").read_text())["rollbacks"]) == 2


def test_damaged_rollback_record_is_named(tmp_path):
    (tmp_path / "health").mkdir()
    (tmp_path / "health" / "rollbacks.json").write_text("{not json")
    with pytest.raises(ValueError, match="rollbacks.json: not a rollback record"):
        RollbackRecord(tmp_path)
