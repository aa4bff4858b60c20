"""The output folder: complete only with its manifest; --overwrite removes only a pack output."""

from __future__ import annotations

import json

import pytest

from pack_stage.pack import PackConfig, PackError, pack
from pack_stage.reader import PackedReader
from pack_stage.schema import PackedDataError
from pack_stage.writer import OutputError, SplitWriter


def config(folder, out, **kwargs) -> PackConfig:
    return PackConfig(folder.path, out, kwargs.pop("seq_len", 8), kwargs.pop("micro_bsz", 4), **kwargs)


def test_manifest_records_the_run(token_folder, tmp_path):
    out = tmp_path / "out"
    pack(config(token_folder, out, valid_fraction=0.2, min_length=2, seed=5, rows_per_part=4), progress=False)
    data = json.loads((out / "manifest.json").read_text())
    token_manifest = json.loads((token_folder.path / "manifest.json").read_text())
    assert data["format"] == "pack_stage/v1"
    assert (data["seq_len"], data["micro_bsz"], data["packed_length"]) == (8, 4, 32)
    assert (data["min_length"], data["seed"], data["shuffle"], data["valid_fraction"]) == (2, 5, True, 0.2)
    assert data["pack_sample_into_one"] is False
    assert data["tokenizer"] == token_manifest["tokenizer"]
    assert data["types"] == token_manifest["types"]
    assert data["input_files"] == sorted(token_manifest["files"])
    assert data["token_manifest"]["folder"] == str(token_folder.path.resolve())
    assert len(data["token_manifest"]["sha256"]) == 64
    assert set(data["splits"]) == {"train", "valid"}
    names = sorted(p.name for p in (out / "train").iterdir())
    assert names == ["documents.arrow"] + [p["name"] for p in data["splits"]["train"]["parts"]]
    assert not list(out.rglob("*.tmp"))


def test_a_killed_pack_never_looks_complete(token_folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original = SplitWriter.write
    written = []

    def write_then_die(self, batch):
        if written:
            raise KeyboardInterrupt  # as if Ctrl-C hit while the second block was written
        written.append(batch.num_rows)
        original(self, batch)

    monkeypatch.setattr(SplitWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        pack(config(token_folder, out, rows_per_part=2), progress=False)
    assert not (out / "manifest.json").exists()
    assert (out / "train" / "part-00000.arrow").is_file()
    assert (out / "train" / "part-00001.arrow.tmp").is_file()
    with pytest.raises(PackedDataError, match="manifest.json does not exist"):
        PackedReader(out)
    monkeypatch.setattr(SplitWriter, "write", original)
    # The same command again finishes the job: an unfinished pack needs no --overwrite (issue 13).
    pack(config(token_folder, out, rows_per_part=2), progress=False)
    assert len(PackedReader(out)) > 0
    assert not list(out.rglob("*.tmp"))
    with pytest.raises(OutputError, match="--overwrite"):  # a finished pack still does
        pack(config(token_folder, out), progress=False)
    assert len(PackedReader(out)) > 0


def test_an_unfinished_pack_with_a_foreign_file_is_not_cleared(token_folder, tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "part-00000.arrow.tmp").write_bytes(b"half a part")
    (out / "train" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="pass --overwrite"):
        pack(config(token_folder, out), progress=False)
    with pytest.raises(OutputError, match="notes.txt"):
        pack(config(token_folder, out, overwrite=True), progress=False)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["notes.txt", "part-00000.arrow.tmp"]


def test_the_same_pack_again_is_a_success_with_nothing_to_do(token_folder, tmp_path):
    """A kill between the manifest and the process's exit leaves a finished pack: the same command
    again must succeed (issue 13), and has nothing to write."""
    out = tmp_path / "out"
    settings = {"valid_fraction": 0.2, "rows_per_part": 3}
    first = pack(config(token_folder, out, **settings), progress=False)
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = pack(config(token_folder, out, **settings), progress=False)
    assert again.to_json() == first.to_json()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == written


def _truncate_a_part(out) -> None:
    part = out / "train" / "part-00000.arrow"
    part.write_bytes(part.read_bytes()[:-8])


@pytest.mark.parametrize(
    "change",
    [
        {"seq_len": 4},
        {"rows_per_part": 2},
        {"valid_fraction": 0.3},
        {"seed": 7},
        {"shuffle": False},
        {"min_length": 2},
        {"pack_sample_into_one": True},
        lambda folder, out: (out / "train" / "part-00000.arrow.tmp").write_bytes(b"left over"),
        lambda folder, out: _truncate_a_part(out),
        lambda folder, out: (folder.path / "manifest.json").write_text(
            (folder.path / "manifest.json").read_text() + "\n"
        ),
    ],
    ids=[
        "seq_len",
        "rows_per_part",
        "valid",
        "seed",
        "shuffle",
        "min_length",
        "into_one",
        "tmp",
        "cut",
        "input",
    ],
)
def test_a_finished_pack_of_anything_else_still_needs_overwrite(token_folder, tmp_path, change):
    out = tmp_path / "out"
    settings = {"valid_fraction": 0.2, "rows_per_part": 3}
    pack(config(token_folder, out, **settings), progress=False)
    if callable(change):
        change(token_folder, out)
    else:
        settings.update(change)
    with pytest.raises(OutputError, match="pass --overwrite"):
        pack(config(token_folder, out, **settings), progress=False)


def test_overwrite_replaces_a_previous_pack(token_folder, tmp_path):
    out = tmp_path / "out"
    pack(config(token_folder, out, valid_fraction=0.3), progress=False)
    manifest = pack(config(token_folder, out, overwrite=True, seq_len=4), progress=False)
    assert manifest.seq_len == 4 and set(manifest.splits) == {"train"}
    assert not (out / "valid").exists()


@pytest.mark.parametrize(
    "setup",
    [
        lambda out: (out / "notes.txt").write_text("mine"),
        lambda out: (out / "train").mkdir() or (out / "train" / "model.pt").write_text("x"),
        lambda out: (out / "manifest.json").write_text(json.dumps({"format": "something/else"})),
    ],
)
def test_overwrite_refuses_a_folder_that_is_not_a_pack_output(token_folder, tmp_path, setup):
    out = tmp_path / "out"
    out.mkdir()
    setup(out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(OutputError, match="refusing to overwrite"):
        pack(config(token_folder, out, overwrite=True), progress=False)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_overwrite_refuses_a_pack_output_with_foreign_files(token_folder, tmp_path):
    out = tmp_path / "out"
    pack(config(token_folder, out), progress=False)
    (out / "train" / "keep-me.txt").write_text("x")
    with pytest.raises(OutputError, match="keep-me.txt"):
        pack(config(token_folder, out, overwrite=True), progress=False)
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seq_len": 0}, "--seq-len must be at least 1"),
        ({"micro_bsz": 0}, "--micro-bsz must be at least 1"),
        ({"valid_fraction": 1.0}, r"--valid-fraction must be in \[0, 1\)"),
        ({"valid_fraction": -0.1}, r"--valid-fraction must be in \[0, 1\)"),
        ({"min_length": -1}, "--min-length"),
        ({"rows_per_part": 0}, "--rows-per-part"),
        ({"min_length": 10_000}, "no documents left to pack"),
    ],
)
def test_bad_settings_are_refused_before_writing(token_folder, tmp_path, kwargs, message):
    out = tmp_path / "out"
    with pytest.raises(PackError, match=message):
        pack(config(token_folder, out, **kwargs), progress=False)
    assert not out.exists()
