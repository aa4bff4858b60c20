"""`pack-stage run` SIGKILLed anywhere, then run again: the output folder ends byte for byte as a
clean pack leaves it, and no rerun of the same command fails on what a kill left behind (an
unfinished pack is cleared without --overwrite; with --overwrite, a kill while the previous pack is
being removed is finished by the next run).

Killed at random moments over the stretch of a clean run that writes the output, and just before
each step it takes in its output folder (the tokenize stage's launcher, kill_at.py)."""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.pack_stage.pack_fixtures import write_token_folder
from tests.tokenize_stage.kill_at import read_steps
from tests.tokenize_stage.killing import (
    Timeline,
    assert_same_tree,
    finished_run,
    run_with_random_kills,
    run_with_step_kills,
    stage_command,
    watched_run,
)

pytestmark = pytest.mark.process

SEED = 20260214
# Rows of 512 tokens, 200 a part: about 1.1 M tokens make some 11 train parts and 2 valid ones.
PACK_ARGS = ("--seq-len", 128, "--micro-bsz", 4, "--valid-fraction", 0.1, "--rows-per-part", 200)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    rng = np.random.default_rng(5)
    files = {
        f"{data_type}/f{i}.jsonl": rng.integers(0, 900, 300).tolist() + [0, 5000]
        for data_type in ("en", "cn", "code", "wiki")
        for i in range(2)
    }
    return write_token_folder(tmp_path_factory.mktemp("pack-kill") / "tokens", files, batch_rows=100).path


@pytest.fixture(scope="module")
def clean(tokens, tmp_path_factory) -> tuple[Path, Timeline]:
    """A pack run without kills, and when it wrote its output."""
    folder = tmp_path_factory.mktemp("pack-clean")
    timeline = watched_run(_pack_command(tokens, folder / "packed"), folder / "run.log", folder / "packed")
    return folder / "packed", timeline


def _pack_command(tokens: Path, out: Path, *extra: object) -> list[str]:
    return stage_command(
        "pack_stage.cli", "run", "--input", tokens, "--output", out, *PACK_ARGS, "--no-progress", *extra
    )


def _state_of(out: Path) -> str:
    if not out.exists():
        return "nothing written"
    if (out / "manifest.json").exists():
        return "manifest written"
    return ", ".join(
        f"{split}: {len(list((out / split).glob('part-*.arrow')))} parts" for split in ("train", "valid")
    )


def _check_complete_if_manifest(out: Path) -> None:
    """A manifest means a complete pack: every part it lists is there, of its size."""
    manifest = out / "manifest.json"
    if manifest.exists():
        for split, info in json.loads(manifest.read_text())["splits"].items():
            for part in info["parts"]:
                path = out / split / part["name"]
                assert path.is_file() and path.stat().st_size == part["size_bytes"], f"{path} is not whole"


def _same_as_clean_then_reset(out: Path, clean: Path, start: Path | None = None) -> Callable[[], None]:
    """Checks the output against the clean pack, then puts back the folder the runs start from."""

    def check() -> None:
        assert_same_tree(out, clean)
        shutil.rmtree(out)
        if start is not None:
            shutil.copytree(start, out)

    return check


def test_random_kills_then_the_same_command_finishes_byte_identical(tokens, clean, tmp_path):
    reference, timeline = clean
    out = tmp_path / "killed"
    kills = run_with_random_kills(
        _pack_command(tokens, out),  # no --overwrite: a killed pack is finished by the same command
        out,
        tmp_path / "runs.log",
        random.Random(SEED),
        span=timeline,
        kills=5,
        finished=_same_as_clean_then_reset(out, reference),
        describe=lambda: _state_of(out),
        check_killed=lambda: _check_complete_if_manifest(out),
    )
    print(f"clean pack: {timeline};", kills.report())
    assert not out.exists()  # cleared by the check of the last run's output


# The phases of an --overwrite run over a finished pack, each as the first step that begins it.
PHASES = [
    ("nothing removed yet", r"unlink manifest\.json"),
    ("the previous manifest removed, its parts being removed", r"unlink train/part-\d+\.arrow"),
    ("the first part written", r"replace train/part-00000\.arrow"),
    ("between two parts", r"replace train/part-00005\.arrow"),
    ("every train part written, not the documents", r"replace train/documents\.arrow"),
    ("the valid parts written, not their documents", r"replace valid/documents\.arrow"),
    ("everything but the manifest", r"replace manifest\.json"),
]


def kill_points(steps: list[str]) -> list[str]:
    """Before the first step of each phase, in a clean run's order."""
    chosen = {name: next((s for s in steps if re.fullmatch(pattern, s)), None) for name, pattern in PHASES}
    missing = [name for name, step in chosen.items() if step is None]
    assert not missing, f"a clean run never reached: {missing}"
    return [step for step in chosen.values() if step is not None]


def test_kill_before_each_step_of_an_overwrite_then_rerun_is_byte_identical(tokens, clean, tmp_path):
    reference = clean[0]
    logs = tmp_path / "runs.log"
    previous = tmp_path / "previous"  # a finished pack of other settings, to be overwritten
    other_settings = ("--seq-len", 64, "--micro-bsz", 2, "--valid-fraction", 0.2, "--rows-per-part", 400)
    finished_run(
        stage_command("pack_stage.cli", "run", "--input", tokens, "--output", previous, *other_settings), logs
    )

    def launcher(out: Path, steps: Path) -> Callable[[str | None], list[str]]:
        def command(target: str | None) -> list[str]:
            stage = _pack_command(tokens, out, "--overwrite")[2:]  # without "python -m"
            stop = [target] if target else []
            return stage_command("tests.tokenize_stage.kill_at", out, steps, *stop, "--", *stage)

        return command

    shutil.copytree(previous, tmp_path / "listed")
    finished_run(launcher(tmp_path / "listed", tmp_path / "listed.steps")(None), logs)
    assert_same_tree(tmp_path / "listed", reference)
    targets = kill_points(read_steps(tmp_path / "listed.steps"))

    out = tmp_path / "killed"
    shutil.copytree(previous, out)
    kills = run_with_step_kills(
        launcher(out, tmp_path / "killed.steps"),
        tmp_path / "killed.steps",
        targets,
        logs,
        finished=_same_as_clean_then_reset(out, reference, start=previous),
        check_killed=lambda: _check_complete_if_manifest(out),
    )
    print(kills.report())
    assert kills.hit == targets
    assert_same_tree(out, previous)  # put back by the check of the last run's output
