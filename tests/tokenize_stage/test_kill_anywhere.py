"""`tokenize-stage run` SIGKILLed anywhere, again and again, then run again: the output folder ends
byte for byte as a clean run leaves it (every name and every byte, hidden folders included), and no
rerun fails on what a kill left behind.

Two ways to stop it: at random moments over the stretch of a clean run that writes the output (the
stage with its worker processes, or the stage alone), and just before each kind of step it takes in
its output folder (in the order a clean run takes them; the run's code is untouched, see
kill_at.py)."""

from __future__ import annotations

import json
import random
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tokenize_stage.kill_at import read_steps
from tests.tokenize_stage.kill_corpus import build_kill_corpus
from tests.tokenize_stage.killing import (
    RUN_TIMEOUT_S,
    Timeline,
    assert_same_tree,
    finished_run,
    kill_group,
    kill_stage_alone,
    living_members,
    run_with_random_kills,
    run_with_step_kills,
    stage_command,
    start,
    watched_run,
)

pytestmark = pytest.mark.process

SEED = 20260213
# --whole-file: the .txt inputs are one-part inputs too. The output does not depend on --workers.
ARGS = ("--chunk-mb", 1, "--whole-file", "--no-progress")


def _run_command(raw: Path, out: Path, *extra: object) -> list[str]:
    return stage_command("tokenize_stage.cli", "run", "--input", raw, "--output", out, *ARGS, *extra)


def _state_of(out: Path) -> str:
    """Where a kill stopped the run, from the files it left."""
    if not out.exists():
        return "nothing written"
    if (out / "manifest.json").exists():
        return "manifest written, hidden folders " + ("left" if (out / ".state").exists() else "gone")
    parts = len(list((out / ".parts").rglob("0*.json")))
    records = len(list((out / ".state").rglob("*.done.json")))
    shards = len([p for p in out.rglob("*.arrow") if not p.relative_to(out).as_posix().startswith(".")])
    return f"{parts} parts, {shards} shards, {records} records"


def _check_complete_if_manifest(out: Path) -> None:
    """A manifest means a complete folder: every shard it lists is there."""
    manifest = out / "manifest.json"
    if manifest.exists():
        for entry in json.loads(manifest.read_text())["files"].values():
            assert (out / entry["shard"]).is_file(), f"manifest lists {entry['shard']}, which is missing"


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("kill-corpus") / "raw"
    build_kill_corpus(folder)
    return folder


@pytest.fixture(scope="module")
def clean(raw, tmp_path_factory) -> tuple[Path, Timeline]:
    """A run without kills (two workers), and when it wrote its output."""
    folder = tmp_path_factory.mktemp("kill-clean")
    timeline = watched_run(
        _run_command(raw, folder / "tokens", "--workers", 2), folder / "run.log", folder / "tokens"
    )
    return folder / "tokens", timeline


def _same_as_clean_then_cleared(out: Path, clean: Path) -> Callable[[], None]:
    def check() -> None:
        assert_same_tree(out, clean)
        shutil.rmtree(out)

    return check


def test_random_kills_then_rerun_is_byte_identical(raw, clean, tmp_path):
    reference, timeline = clean
    out = tmp_path / "killed"
    kills = run_with_random_kills(
        _run_command(raw, out, "--workers", 2),
        out,
        tmp_path / "runs.log",
        random.Random(SEED),
        span=timeline,
        kills=6,
        finished=_same_as_clean_then_cleared(out, reference),
        describe=lambda: _state_of(out),
        check_killed=lambda: _check_complete_if_manifest(out),
        alone_every=2,
    )
    print(f"clean run: {timeline};", kills.report())
    assert not out.exists()  # cleared by the check of the last run's output


def test_workers_end_when_the_stage_alone_is_killed(raw, tmp_path):
    """kill -9 of the stage's pid (or `timeout -s KILL`) spares its worker processes, which used to
    wait forever for work, each holding its tokenizer; now they end by themselves."""
    out = tmp_path / "killed"
    process = start(_run_command(raw, out, "--workers", 2), tmp_path / "run.log")
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not list((out / ".parts").rglob("0*.json")) and process.poll() is None:
            assert time.monotonic() < deadline, "no unit finished"
            time.sleep(0.01)
        assert process.poll() is None, "the run ended before it could be killed"
        assert len(living_members(process.pid)) >= 3  # the stage and its two workers, at least
        kill_stage_alone(process)  # asserts that the rest of its process group ends within seconds
        assert not living_members(process.pid)
    finally:
        if process.poll() is None:
            kill_group(process)


def _files_by_parts(steps: list[str], files: list[str]) -> dict[str, int]:
    """How many parts (work units) each input file was cut into, from a run's steps."""
    return {
        rel: sum(bool(re.fullmatch(rf"replace \.parts/{re.escape(rel)}/\d{{6}}\.arrow", s)) for s in steps)
        for rel in files
    }


# The phases of a run, each as the first step that begins it; `one` / `several`: the input file the
# step is about, if any, is finished from one part / from several.
PHASES: list[tuple[str, str]] = [
    ("settings recorded", r"replace \.state/settings\.json"),
    ("a one-part file's part written, not its stats", r"replace \.parts/<one>/000000\.json"),
    ("its shard linked under a temporary name", r"link <one>\.arrow\.tmp-\*"),
    ("its shard placed, not yet recorded", r"replace <one>\.arrow"),
    ("its parts being removed", r"unlink \.parts/<one>/.+"),
    ("a several-part file between two units", r"replace \.parts/<several>/000001\.arrow"),
    ("its parts joined, the shard not yet renamed", r"replace <several>\.arrow"),
    ("its rejects being written", r"replace <several>\.rejects\.jsonl"),
    ("its parts being removed", r"unlink \.parts/<several>/.+"),
    ("every file recorded, no manifest", r"replace manifest\.json"),
    ("manifest written, parts folders being removed", r"rmdir \.parts/[^/<]+"),
]


def _generic(step: str, parts: dict[str, int]) -> str:
    for rel in sorted(parts, key=len, reverse=True):
        if rel in step:
            return step.replace(rel, "<several>" if parts[rel] > 1 else "<one>")
    return step


def kill_points(steps: list[str], sizes: dict[str, int]) -> list[str]:
    """Where to kill, in a clean run's order: before the first step of each phase, and before the
    record of a one-part input of each format (its shard placed: the window of the one-part bug)."""
    parts = _files_by_parts(steps, list(sizes))
    # The first one-part, non-empty input of each format (reversed: the first written last wins).
    formats = {"".join(Path(rel).suffixes): rel for rel in reversed(sizes) if parts[rel] == 1 and sizes[rel]}
    records = {f"replace .state/{rel}.done.json" for rel in formats.values()}
    chosen: list[str] = []
    reached: set[int] = set()
    for step in steps:
        generic = _generic(step, parts)
        for index, (_, pattern) in enumerate(PHASES):
            if index not in reached and re.fullmatch(pattern, generic):
                reached.add(index)
                chosen.append(step)
        if step in records:
            chosen.append(step)
    missing = [name for index, (name, _) in enumerate(PHASES) if index not in reached]
    assert not missing, f"a clean run never reached: {missing}"
    assert len(records) == 5, f"expected .gz, .zst, .txt, .jsonl and .parquet one-part inputs: {formats}"
    return list(dict.fromkeys(chosen))


def test_kill_before_each_kind_of_step_then_rerun_is_byte_identical(raw, clean, tmp_path):
    reference = clean[0]
    logs = tmp_path / "runs.log"

    def launcher(out: Path, steps: Path) -> Callable[[str | None], list[str]]:
        def command(target: str | None) -> list[str]:
            # --workers 1: the units run in the stage's own process, where kill_at sees every step.
            stage = _run_command(raw, out, "--workers", 1)[2:]  # without "python -m"
            stop = [target] if target else []
            return stage_command("tests.tokenize_stage.kill_at", out, steps, *stop, "--", *stage)

        return command

    listed = tmp_path / "listed.steps"
    finished_run(launcher(tmp_path / "listed", listed)(None), logs)
    assert_same_tree(tmp_path / "listed", reference)  # watching, and one worker, change nothing
    sizes = {p.relative_to(raw).as_posix(): p.stat().st_size for p in sorted(raw.rglob("*")) if p.is_file()}
    targets = kill_points(read_steps(listed), sizes)

    out = tmp_path / "killed"
    kills = run_with_step_kills(
        launcher(out, tmp_path / "killed.steps"),
        tmp_path / "killed.steps",
        targets,
        logs,
        finished=_same_as_clean_then_cleared(out, reference),
        check_killed=lambda: _check_complete_if_manifest(out),
    )
    print(kills.report())
    assert kills.hit == targets
    assert not out.exists()  # cleared by the check of the last run's output
