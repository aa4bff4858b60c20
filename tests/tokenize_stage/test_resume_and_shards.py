"""Resume after SIGKILL gives byte-identical output, redoing only unfinished inputs; output does
not depend on the worker count; a multi-machine run merged equals a single-machine run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli, write_jsonl
from tests.tokenize_stage.helpers import tokenize, tree_digest
from tokenize_stage.merge import MergeError, merge_shard_manifests

WORDS = ["pack", "token", "shard", "arrow", "训练", "données", "gradient", "loss", "λ", "checkpoint"]


def _corpus(raw, files: int, lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    for f in range(files):
        folder = ("en", "cn", "code")[f % 3]
        write_jsonl(
            raw / folder / f"part-{f}.jsonl",
            [{"content": " ".join(rng.choices(WORDS, k=rng.randint(1, 120)))} for _ in range(lines)],
        )


def test_output_is_the_same_for_any_worker_count(tmp_path):
    _corpus(tmp_path / "raw", files=3, lines=3000)
    tokenize(tmp_path / "raw", tmp_path / "one", workers=1, chunk_bytes=100 << 10)
    tokenize(tmp_path / "raw", tmp_path / "two", workers=2, chunk_bytes=100 << 10)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


@pytest.mark.process
def test_sigkill_then_resume_is_byte_identical(tmp_path, hf_tokenizer_json):
    raw = tmp_path / "raw"
    _corpus(raw, files=4, lines=6000)
    args = [
        "--input",
        str(raw),
        "--tokenizer",
        str(hf_tokenizer_json),
        "--workers",
        "2",
        "--chunk-mb",
        "1",
        "--no-progress",
    ]
    run_cli("tokenize_stage.cli", "run", "--output", str(tmp_path / "clean"), *args)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenize_stage.cli", "run", "--output", str(killed), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60

    def finished_units() -> int:
        return len(list((killed / ".parts").rglob("0*.json"))) + len(
            list((killed / ".state").rglob("*.done.json"))
        )

    while finished_units() < 2:
        assert process.poll() is None, "the run finished before it could be killed: make the corpus bigger"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the stage and its workers, as a node failure would
    process.wait()
    assert not (killed / "manifest.json").exists()
    assert finished_units() >= 2

    result = run_cli("tokenize_stage.cli", "run", "--output", str(killed), *args)
    assert tree_digest(killed) == tree_digest(tmp_path / "clean")
    assert "tokenized" in result.stdout


def test_rerun_skips_finished_inputs_and_follows_changes(tmp_path):
    raw = tmp_path / "raw"
    _corpus(raw, files=3, lines=200)
    tokenize(raw, tmp_path / "tok")
    before = tree_digest(tmp_path / "tok")
    report = tokenize(raw, tmp_path / "tok")
    assert (report.files_done, report.files_skipped) == (0, 3)
    assert tree_digest(tmp_path / "tok") == before

    write_jsonl(raw / "en" / "part-0.jsonl", [{"content": "rewritten"}])
    (raw / "cn" / "part-1.jsonl").unlink()
    report = tokenize(raw, tmp_path / "tok")
    assert (report.files_done, report.files_skipped) == (1, 1)
    after = tree_digest(tmp_path / "tok")
    assert "cn/part-1.jsonl.arrow" not in after
    assert after["en/part-0.jsonl.arrow"] != before["en/part-0.jsonl.arrow"]
    assert after["code/part-2.jsonl.arrow"] == before["code/part-2.jsonl.arrow"]


@pytest.mark.process
def test_shards_over_machines_merge_to_the_single_machine_result(tmp_path):
    raw = tmp_path / "raw"
    _corpus(raw, files=7, lines=300)
    tokenize(raw, tmp_path / "single")
    for index in (2, 0):
        tokenize(raw, tmp_path / "multi", num_shards=3, shard_index=index)
    with pytest.raises(MergeError, match=r"shards \[1\] of 3 have not finished"):
        merge_shard_manifests(tmp_path / "multi")
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1"}  # the index a Slurm array hands each task
    run_cli(
        "tokenize_stage.cli",
        "run",
        "--input",
        str(raw),
        "--output",
        str(tmp_path / "multi"),
        "--num-shards",
        "3",
        "--no-progress",
        env=env,
    )
    run_cli("tokenize_stage.cli", "merge", str(tmp_path / "multi"))
    assert tree_digest(tmp_path / "multi") == tree_digest(tmp_path / "single")


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 4 << 10], ids=["one-part", "several-parts"])
def test_stopped_between_a_shard_and_its_record_the_rerun_finishes_byte_identical(
    tmp_path, monkeypatch, chunk_bytes
):
    """The window the issue found: a one-part file's part moved onto its shard, the run stopped
    before the file's record was written; every later run failed with FileNotFoundError."""
    from tokenize_stage import shards

    raw = tmp_path / "raw"
    write_jsonl(raw / "en" / "a.jsonl", [{"content": f"document {i} " + "z" * 30} for i in range(600)])
    write_jsonl(raw / "code" / "b.jsonl", [{"content": f"x = {i}"} for i in range(50)])
    tokenize(raw, tmp_path / "clean", workers=1, chunk_bytes=chunk_bytes)
    real_write = shards.write_json_atomic

    def stop_at_the_first_record(path, data):
        if str(path).endswith(".done.json"):
            raise KeyboardInterrupt("stopped between the shard and its record")
        real_write(path, data)

    monkeypatch.setattr(shards, "write_json_atomic", stop_at_the_first_record)
    with pytest.raises(KeyboardInterrupt):
        tokenize(raw, tmp_path / "tok", workers=1, chunk_bytes=chunk_bytes)
    monkeypatch.setattr(shards, "write_json_atomic", real_write)
    tokenize(raw, tmp_path / "tok", workers=1, chunk_bytes=chunk_bytes)
    assert tree_digest(tmp_path / "tok") == tree_digest(tmp_path / "clean")


def test_a_run_adding_an_input_stopped_early_keeps_what_the_manifest_recorded(tmp_path, monkeypatch):
    """The manifest leaves the folder when a run starts (the folder is incomplete until the end); it
    used to be deleted, so a run adding one input, stopped before its end, made the next run redo
    every input. It is set aside in .state/ instead."""
    from tokenize_stage import runner

    raw = tmp_path / "raw"
    _corpus(raw, files=4, lines=50)
    tokenize(raw, tmp_path / "tok")
    write_jsonl(raw / "en" / "new.jsonl", [{"content": "one more input"}])
    tokenize(raw, tmp_path / "clean")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped before the new input's first unit")

    monkeypatch.setattr(runner, "prepare_parts", stopped)
    with pytest.raises(KeyboardInterrupt):
        tokenize(raw, tmp_path / "tok")
    assert not (tmp_path / "tok" / "manifest.json").exists()  # incomplete, and it does not look complete
    monkeypatch.undo()
    report = tokenize(raw, tmp_path / "tok")
    assert (report.files_done, report.files_skipped) == (1, 4)
    assert tree_digest(tmp_path / "tok") == tree_digest(tmp_path / "clean")
