"""The stop file when it cannot be looked at (NFS's ESTALE, EIO, a folder replaced by a file, a link
loop): training goes on, one warning per kind of error, and an order already read stays in force."""

from __future__ import annotations

import logging
import os

from tests.train_kernel.checkpoint.helpers import config_text, train_records
from train_kernel.config import config_from_text
from train_kernel.train.stop_file import SAVE, STOP, StopFile
from train_kernel.train.trainer import train


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_path_through_a_file_or_a_link_loop_is_warned_about_once(tmp_path, caplog):
    (tmp_path / "plain").write_text("")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    for path, error in ((tmp_path / "plain" / "stop", "NotADirectoryError"), (tmp_path / "loop", "OSError")):
        caplog.clear()
        stop_file = StopFile(str(path))
        assert [stop_file.order_at(step) for step in range(5)] == [None] * 5
        (warning,) = _warnings(caplog)
        assert str(path) in warning and error in warning and "training goes on" in warning


def test_an_order_read_before_the_file_became_unreadable_stays_in_force(tmp_path, caplog):
    folder = tmp_path / "share"
    folder.mkdir()
    (folder / "stop").write_text("save 3\n")
    stop_file = StopFile(str(folder / "stop"))
    assert stop_file.order_at(2) is None
    (folder / "stop").unlink()
    folder.rmdir()
    folder.write_text("")  # the folder is now a file: stat of share/stop fails with ENOTDIR
    assert stop_file.order_at(3) == SAVE
    folder.unlink()
    folder.mkdir()
    (folder / "stop").write_text("5\n")
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert stop_file.order_at(5) == STOP
    assert any("readable again" in r.getMessage() for r in caplog.records)


def test_training_goes_on_when_the_stop_file_cannot_be_read(tmp_path):
    (tmp_path / "plain").write_text("")
    stop_path = tmp_path / "plain" / "stop"
    extra = f"\nckpt['stop_file_path'] = {str(stop_path)!r}\n"
    train(config_from_text(config_text(tmp_path / "run", extra=extra, total_steps=4)))
    assert [r["step"] for r in train_records(tmp_path / "run")] == [0, 1, 2, 3]
    assert "stop file" in (tmp_path / "run" / "train.log").read_text()
