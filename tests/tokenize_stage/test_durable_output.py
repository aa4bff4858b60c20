"""Files that a later run or stage trusts by their name reach the disk before the name does: the
data is fsynced before the rename, the folder after it (both data stages). Watched by wrapping the
real os.fsync / os.replace, which still run."""

from __future__ import annotations

import os
from pathlib import Path

from pack_stage.pack import PackConfig, pack
from tests.conftest import write_jsonl
from tests.pack_stage.pack_fixtures import mixed_corpus, write_token_folder
from tests.tokenize_stage.helpers import tokenize


def _watch(monkeypatch) -> list[tuple]:
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _assert_durable(events: list[tuple], suffix: str) -> int:
    renames = [event for event in events if event[0] == "replace" and event[2].endswith(suffix)]
    for rename in renames:
        at = events.index(rename)
        assert ("fsync", rename[1]) in events[:at], f"{rename[1]} renamed before its data was synced"
        assert ("fsync", str(Path(rename[2]).parent)) in events[at + 1 :], f"{rename[2]}: folder not synced"
    return len(renames)


def test_tokenize_shards_and_records_are_synced_before_their_names(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    write_jsonl(raw / "en" / "small.jsonl", [{"content": "a short document"}] * 10)
    write_jsonl(raw / "code" / "big.jsonl", [{"content": f"def f{i}(): return {i}"} for i in range(4000)])
    events = _watch(monkeypatch)
    tokenize(raw, tmp_path / "tok", workers=1, chunk_bytes=16 << 10)  # big.jsonl: several parts joined
    assert _assert_durable(events, ".arrow") >= 2 + 4  # two shards, and the parts of big.jsonl
    assert _assert_durable(events, "manifest.json") == 1


def test_pack_parts_documents_and_manifest_are_synced_before_their_names(tmp_path, monkeypatch):
    folder = write_token_folder(tmp_path / "tokens", mixed_corpus())
    events = _watch(monkeypatch)
    pack(
        PackConfig(folder.path, tmp_path / "packed", 8, 4, valid_fraction=0.2, rows_per_part=5),
        progress=False,
    )
    assert _assert_durable(events, ".arrow") >= 3
    assert _assert_durable(events, "manifest.json") == 1
