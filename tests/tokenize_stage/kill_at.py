"""Test-only launcher: runs a stage's CLI in this process and SIGKILLs its whole process group just
before a chosen step in the output folder, as kill -9 or a node failure would at that moment.

    python -m tests.tokenize_stage.kill_at OUTPUT STEPS_FILE [STEP] -- MODULE ARGS...

A step is a change to a name under OUTPUT made through the os module: a rename, link, unlink,
rmdir, or mkdir of a missing folder (pathlib and shutil.rmtree go through those). Each is appended
to STEPS_FILE as "op path" (path relative to OUTPUT, a process id in a temporary name written as
``*``) before it happens. With STEP (such a line) the process group is killed before the first
step equal to it; the run's own code is untouched. Only this process is watched: worker processes
write unseen (run the tokenize stage with --workers 1 to see its parts being written)."""

from __future__ import annotations

import os
import re
import runpy
import signal
import sys
from collections.abc import Callable
from pathlib import Path

_TMP_PID = re.compile(r"\.tmp-\d+$")
# op -> index of the argument naming the changed path (the target of a rename or link).
_WATCHED = {"replace": 1, "rename": 1, "link": 1, "unlink": 0, "remove": 0, "rmdir": 0, "mkdir": 0}


def step_name(op: str, rel: str) -> str:
    return f"{op} {_TMP_PID.sub('.tmp-*', rel)}"


def _die() -> None:
    if os.getpgrp() == os.getpid():  # started as a session of its own: take the workers too
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _absolute(path: object, dir_fd: int | None) -> str:
    name = os.fsdecode(path)  # type: ignore[arg-type]
    if dir_fd is not None:
        name = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), name)
    name = os.path.abspath(name)
    return os.path.join(os.path.realpath(os.path.dirname(name)), os.path.basename(name))


def _changes(op: str, where: str) -> bool:
    exists = os.path.lexists(where)
    return not exists if op == "mkdir" else exists or op in ("replace", "rename", "link")


def _watch(output: str, steps: Callable[[str], None], stop_before: str | None) -> None:
    def wrap(op: str, real: Callable) -> Callable:
        position = _WATCHED[op]

        def watched(*args, **kwargs):
            where = _absolute(args[position], kwargs.get("dst_dir_fd" if position else "dir_fd"))
            if (where == output or where.startswith(output + os.sep)) and _changes(op, where):
                step = step_name(op, os.path.relpath(where, output))
                steps(step)
                if step == stop_before:
                    _die()
            return real(*args, **kwargs)

        return watched

    for op in _WATCHED:
        setattr(os, op, wrap(op, getattr(os, op)))


def read_steps(steps_file: Path) -> list[str]:
    return steps_file.read_text(encoding="utf-8").splitlines() if steps_file.exists() else []


def main(argv: list[str]) -> None:
    split = argv.index("--")
    options, (module, *args) = argv[:split], argv[split + 1 :]
    output, steps_file = os.path.realpath(options[0]), options[1]
    stop_before = options[2] if len(options) > 2 else None
    log = open(steps_file, "a", buffering=1, encoding="utf-8")  # line-buffered, open until the end
    _watch(output, lambda step: log.write(step + "\n"), stop_before)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
