"""Folders made by InternLM's tools as data.train_folder / data.valid_folder, the config unmodified:
packed once into a cache that every rank and every later run (resume included) reuses, and a
valid_folder evaluated per subfolder with InternLM's record names."""

from __future__ import annotations

import json
import threading
import time

import pytest

import pack_stage.pack as pack_module
from tests.pack_stage.internlm_writer import random_documents, write_bin
from tests.train_kernel.train.tiny_config import tiny_config_text
from train_kernel.config import config_from_text
from train_kernel.data.internlm_folders import (
    InternLMDataError,
    PackSettings,
    packed_internlm_folder,
    validation_sets,
)
from train_kernel.data.row_sources import validation_row_sources
from train_kernel.train.trainer import train


def _data(tmp_path):
    for index, kind in enumerate(("en", "cn", "code")):
        write_bin(tmp_path / "train" / kind / f"{kind}-0.bin", random_documents(40, index))
    write_bin(tmp_path / "valid" / "en" / "dataset.bin", random_documents(10, 7))
    write_bin(tmp_path / "valid" / "zhihu" / "dataset.bin", random_documents(6, 8))
    return tmp_path / "train", tmp_path / "valid"


def _config(tmp_path, train_folder, valid_folder, total_steps):
    text = tiny_config_text(
        tmp_path / "run",
        train_folder=str(train_folder),
        valid_every=2,
        total_steps=total_steps,
        save=True,
        checkpoint_every=2,
    )
    return config_from_text(
        text + f'data["valid_folder"] = {str(valid_folder)!r}\nckpt["auto_resume"] = True\n'
    )


def _records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_internlm_folders_train_pack_once_validate_per_subfolder_and_resume_from_the_cache(tmp_path):
    train_folder, valid_folder = _data(tmp_path)
    train(_config(tmp_path, train_folder, valid_folder, total_steps=2))
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("packed it into the cache") == 3 and "reusing" not in log  # train + 2 valid sets
    steps = _records(tmp_path / "run", "train")
    for kind in ("en", "cn", "code"):  # InternLM's type names from its folder names
        assert sum(r[f"tokens/{kind}"] for r in steps) > 0
    valid = _records(tmp_path / "run", "valid")
    assert sorted(k for r in valid for k in r if k.startswith("val/")) == sorted(
        f"val/{name}_{field}" for name in ("en", "zhihu") for field in ("loss", "acc", "plex", "seconds")
    )
    assert all(r["step"] == 1 for r in valid)
    assert "Validation on zhihu: " in log

    # The resumed run (auto_resume from step 2) packs nothing: it names the cache it reuses.
    train(_config(tmp_path, train_folder, valid_folder, total_steps=3))
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("packed it into the cache") == 3 and log.count("reusing its packed cache") == 3
    assert [r["step"] for r in _records(tmp_path / "run", "train")] == [0, 1, 2]
    entries = sorted(p.name for p in (tmp_path / "run" / "packed_data").iterdir() if p.is_dir())
    assert len(entries) == 3 and [e.split("-")[0] for e in entries] == ["en", "train", "zhihu"]


def test_ranks_packing_at_once_share_one_pack(tmp_path, monkeypatch):
    train_folder, _ = _data(tmp_path)
    conversions = []
    convert = pack_module.convert_internlm_folder

    def slow_convert(*args, **kwargs):
        conversions.append(threading.get_ident())
        time.sleep(0.3)  # long enough that an unguarded second rank would convert too
        return convert(*args, **kwargs)

    monkeypatch.setattr(pack_module, "convert_internlm_folder", slow_convert)
    results = []
    settings = PackSettings(seq_len=32, micro_bsz=2)

    def rank():
        results.append(
            packed_internlm_folder(train_folder, settings, tmp_path / "cache", "data.train_folder")
        )

    threads = [threading.Thread(target=rank) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(conversions) == 1 and len(set(results)) == 1 and len(results) == 3
    # Other packing settings are another cache entry.
    other = packed_internlm_folder(train_folder, PackSettings(32, 1), tmp_path / "cache", "data.train_folder")
    assert other != results[0] and len(conversions) == 2


def test_validation_sets_are_named_as_internlm_names_them(tmp_path):
    for rel in ("a/en/x.bin", "b/en/y.bin", "zhihu/z.bin"):
        write_bin(tmp_path / "valid" / rel, [[1, 2, 3]])
    assert list(validation_sets(tmp_path / "valid")) == ["a/en", "b/en", "zhihu"]
    write_bin(tmp_path / "valid" / "zhihu" / "deeper" / "w.bin", [[1, 2]])
    with pytest.raises(InternLMDataError, match="move them into a folder of their own"):
        validation_sets(tmp_path / "valid")


def test_an_internlm_train_folder_without_valid_folder_is_not_validated_on_its_own_data(tmp_path):
    train_folder, _ = _data(tmp_path)
    text = tiny_config_text(tmp_path / "run", train_folder=str(train_folder), valid_every=2)
    assert validation_row_sources(config_from_text(text), tmp_path / "run") == {}
