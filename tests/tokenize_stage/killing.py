"""Killing a stage's CLI process group with SIGKILL, at random moments or before chosen steps, and
running the same command again until it finishes; shared by the tokenize and pack kill tests."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.tokenize_stage.kill_at import read_steps

ROOT = Path(__file__).resolve().parents[2]
# A run that a kill did not stop must finish within this; a hung run fails the test instead.
RUN_TIMEOUT_S = 120
# Worker processes of a stage killed alone must end within this.
ORPHAN_TIMEOUT_S = 10


def tree_snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``, hidden ones included: a file's sha256, "dir" for a folder."""
    return {
        p.relative_to(folder).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def assert_same_tree(found: Path, expected: Path) -> None:
    have, want = tree_snapshot(found), tree_snapshot(expected)
    extra = sorted(set(have) - set(want))
    missing = sorted(set(want) - set(have))
    differ = sorted(name for name in set(have) & set(want) if have[name] != want[name])
    assert not (extra or missing or differ), (
        f"{found} differs from the clean run {expected}: extra {extra}, missing {missing}, different {differ}"
    )


def stage_command(module: str, *args: object) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def start(command: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as sink:
        # A session of its own: the kill takes the stage and its workers, as a node failure would.
        return subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=sink, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # ended just before the kill
        pass
    process.wait()


def living_members(group: int) -> list[int]:
    """Processes of the process group that are still running (not zombies)."""
    living = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            living.append(int(stat.parent.name))
    return living


def kill_stage_alone(process: subprocess.Popen) -> None:
    """SIGKILLs the stage's own process only, as `kill -9 <pid>` or `timeout -s KILL` would; its
    worker processes must then end by themselves."""
    try:
        process.kill()
    except ProcessLookupError:
        pass
    process.wait()
    deadline = time.monotonic() + ORPHAN_TIMEOUT_S
    while living_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = living_members(process.pid)
    if left:
        kill_group(process)  # whatever the check finds, nothing is left running
    assert not left, f"processes {left} outlived the stage by {ORPHAN_TIMEOUT_S} s"


def _wait(process: subprocess.Popen, timeout: float) -> bool:
    """True when the process ended within ``timeout`` seconds."""
    try:
        process.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        return False


def finished_run(command: list[str], log: Path) -> None:
    """Runs the command to its end; it must succeed."""
    process = start(command, log)
    _check_finished(process, log, _wait(process, RUN_TIMEOUT_S))


@dataclass(frozen=True)
class Timeline:
    """When, in seconds after its start, a run first had something in its output folder, when its
    manifest appeared, and when it ended: it writes its output from the first to the second."""

    writing_from: float
    manifest_at: float
    ended_at: float


def watched_run(command: list[str], log: Path, output: Path) -> Timeline:
    """Runs the command to its end (it must succeed), watching its output folder."""
    started = time.monotonic()
    process = start(command, log)
    writing_from = manifest_at = None
    while process.poll() is None and time.monotonic() - started < RUN_TIMEOUT_S:
        now = time.monotonic() - started
        if writing_from is None and output.is_dir() and any(output.iterdir()):
            writing_from = now
        if manifest_at is None and (output / "manifest.json").exists():
            manifest_at = now
        time.sleep(0.002)
    _check_finished(process, log, process.poll() is not None)
    end = time.monotonic() - started
    return Timeline(writing_from or end, manifest_at or end, end)


def _check_finished(process: subprocess.Popen, log: Path, ended: bool = True) -> None:
    """The run ended by itself (a hung one is killed) and succeeded."""
    if not ended:
        kill_group(process)
    assert ended, f"the run did not finish within {RUN_TIMEOUT_S} s; its output:\n{log.read_text()[-3000:]}"
    assert process.returncode == 0, (
        f"a run failed (exit {process.returncode}) after the kills; its output:\n{log.read_text()[-3000:]}"
    )
    assert process.poll() is not None


@dataclass
class KillLog:
    """What the kills hit: the delay of each kill (after the run's first change to its output),
    the state the output was left in, and how many runs ended by themselves between kills."""

    delays: list[float] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    completed: int = 0

    def report(self) -> str:
        lines = [
            f"{delay:.3f} s after its first change: {state}" for delay, state in zip(self.delays, self.states)
        ]
        head = f"{len(lines)} kills, {self.completed} runs ended by themselves between them:"
        return "\n  ".join([head, *lines])


def _listing(output: Path) -> list[tuple[str, int, int]] | None:
    """Every entry under ``output`` with its size and modification time; None if it is absent."""
    while True:
        if not output.exists():
            return None
        found = []
        try:
            for path in output.rglob("*"):
                try:
                    stat = path.lstat()
                except FileNotFoundError:  # removed while we looked
                    continue
                found.append((path.as_posix(), stat.st_size, stat.st_mtime_ns))
        except FileNotFoundError:  # a folder removed while rglob walked it: look again
            continue
        return sorted(found)


def _first_change(process: subprocess.Popen, output: Path) -> bool:
    """Waits until something under ``output`` changes (True) or the process ends (False)."""
    before = _listing(output)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        if _listing(output) != before:
            return True
        time.sleep(0.002)
    return False


def run_with_random_kills(
    command: list[str],
    output: Path,
    log: Path,
    rng: random.Random,
    span: Timeline,
    kills: int,
    finished: Callable[[], None],
    describe: Callable[[], str],
    check_killed: Callable[[], None] = lambda: None,
    alone_every: int = 0,
) -> KillLog:
    """Starts the command again and again, SIGKILLing its process group at a random moment after
    it begins to change its output folder (before, a kill leaves nothing to get wrong; timed from
    there, the start-up's jitter does not matter), until ``kills`` runs were killed; then once
    more without a kill. The delays are spread over the stretch in which a clean run wrote its
    output (``span``): one drawn from each of ``kills`` equal slices, in a random order. A run
    that ends by itself must succeed; ``finished`` then checks the output and clears it, so that
    the next kills start again from nothing (and the slice is drawn from again); a run from
    nothing that ended first shows the stretch is shorter now, and it is shrunk to match.
    ``describe`` names the state each kill left, ``check_killed`` checks it. Every
    ``alone_every``-th kill takes the stage's own process only: its workers must end by
    themselves."""
    done = KillLog()
    slices = list(range(kills))
    rng.shuffle(slices)
    stretch = span.manifest_at - span.writing_from
    for _ in range(5 * kills):
        if len(done.delays) == kills:
            break
        delay = (slices[len(done.delays)] + rng.random()) * stretch / kills
        from_nothing = not output.exists()
        process = start(command, log)
        changing = _first_change(process, output)
        changed_at = time.monotonic()
        if not changing or _wait(process, delay):
            _check_finished(process, log, process.poll() is not None)
            if from_nothing:
                stretch = min(stretch, time.monotonic() - changed_at)
            done.completed += 1
            finished()
            continue
        alone = alone_every > 0 and len(done.delays) % alone_every == alone_every - 1
        if alone:
            kill_stage_alone(process)
        else:
            kill_group(process)
        done.delays.append(delay)
        done.states.append(describe() + (" (the stage alone killed)" if alone else ""))
        check_killed()
    assert len(done.delays) == kills, f"only {len(done.delays)} of {kills} runs could be killed"
    process = start(command, log)
    _check_finished(process, log, _wait(process, RUN_TIMEOUT_S))
    finished()
    return done


@dataclass
class StepKills:
    hit: list[str] = field(default_factory=list)  # the targets, each killed before once
    completed: int = 0  # runs that ended by themselves before the last

    def report(self) -> str:
        head = f"{len(self.hit)} kills, {self.completed} runs ended by themselves between them; before:"
        return "\n  ".join([head, *self.hit])


def run_with_step_kills(
    launcher: Callable[[str | None], list[str]],
    steps_file: Path,
    targets: list[str],
    log: Path,
    finished: Callable[[], None],
    check_killed: Callable[[], None] = lambda: None,
) -> StepKills:
    """For each target step in turn, runs ``launcher(target)`` (a kill_at command line) on what
    the runs before left, to be SIGKILLed just before that step. A run that ends first (the steps
    left to it do not include the target) must succeed; ``finished`` then checks the output and
    puts back the starting state, and the target is tried again from there. Ends with one run
    without a kill and ``finished``."""
    done = StepKills()
    for target in targets:
        for attempt in range(2):
            before = len(read_steps(steps_file))
            process = start(launcher(target), log)
            ended = _wait(process, RUN_TIMEOUT_S)
            if process.returncode == -signal.SIGKILL:
                steps = read_steps(steps_file)
                assert len(steps) > before and steps[-1] == target, f"killed, but not before {target}"
                done.hit.append(target)
                check_killed()
                break
            _check_finished(process, log, ended)
            assert attempt == 0, f"a run from the start ended without reaching {target}"
            done.completed += 1
            finished()
    process = start(launcher(None), log)
    _check_finished(process, log, _wait(process, RUN_TIMEOUT_S))
    finished()
    return done
