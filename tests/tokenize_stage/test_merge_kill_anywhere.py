"""`tokenize-stage merge` SIGKILLed just before each step it takes in the output folder, then run
again: the folder ends byte for byte as an uninterrupted merge leaves it, and no rerun fails on what
a kill left behind (see kill_at.py for how the steps are watched)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tokenize_stage.helpers import tokenize
from tests.tokenize_stage.kill_at import read_steps
from tests.tokenize_stage.killing import assert_same_tree, finished_run, run_with_step_kills, stage_command
from tests.tokenize_stage.test_resume_and_shards import _corpus
from tokenize_stage.merge import MergeError, merge_shard_manifests

pytestmark = pytest.mark.process


@pytest.fixture
def shards(tmp_path) -> Path:
    """The output folder of a run over three machines, every shard finished, not yet merged."""
    _corpus(tmp_path / "raw", files=5, lines=40)
    for index in range(3):
        tokenize(tmp_path / "raw", tmp_path / "shards", num_shards=3, shard_index=index)
    return tmp_path / "shards"


def _merge_command(out: Path, steps: Path) -> Callable[[str | None], list[str]]:
    def command(target: str | None) -> list[str]:
        stop = [target] if target else []
        return stage_command(
            "tests.tokenize_stage.kill_at", out, steps, *stop, "--", "tokenize_stage.cli", "merge", out
        )

    return command


def test_kill_before_each_step_of_a_merge_then_rerun_is_byte_identical(shards, tmp_path):
    logs = tmp_path / "runs.log"
    clean = tmp_path / "clean"
    shutil.copytree(shards, clean)
    finished_run(_merge_command(clean, tmp_path / "clean.steps")(None), logs)
    targets = list(dict.fromkeys(read_steps(tmp_path / "clean.steps")))
    # manifest.json in place, then each shard manifest dropped, then the hidden folders.
    assert any(step.startswith("replace manifest.json") for step in targets), targets
    assert sum(step.startswith("unlink manifest.shard-") for step in targets) == 3, targets

    out = tmp_path / "killed"
    shutil.copytree(shards, out)

    def same_as_clean_then_restored() -> None:
        assert_same_tree(out, clean)
        shutil.rmtree(out)
        shutil.copytree(shards, out)

    kills = run_with_step_kills(
        _merge_command(out, tmp_path / "killed.steps"),
        tmp_path / "killed.steps",
        targets,
        logs,
        finished=same_as_clean_then_restored,
    )
    print(kills.report())
    assert kills.hit == targets


def test_a_merged_manifest_next_to_a_foreign_shard_manifest_is_refused_untouched(shards, tmp_path):
    merge_shard_manifests(shards)
    foreign = tmp_path / "other"
    _corpus(tmp_path / "raw2", files=2, lines=10, seed=7)
    tokenize(tmp_path / "raw2", foreign, num_shards=2, shard_index=1)
    stray = next(foreign.glob("manifest.shard-*.json"))
    shutil.copy(stray, shards / stray.name)
    with pytest.raises(MergeError, match="not part of it"):
        merge_shard_manifests(shards)
    assert (shards / stray.name).exists() and (shards / "manifest.json").exists()
