"""train/ builds on parallel/, never the reverse: the pipeline schedules take the loss from the
trainer as a callable, so parallel/ must not import train/ (a cycle, and loss code in parallel)."""

from __future__ import annotations

import ast
from pathlib import Path

import train_kernel.parallel

PARALLEL = Path(train_kernel.parallel.__file__).parent


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_parallel_never_imports_train():
    files = sorted(PARALLEL.glob("*.py"))
    assert len(files) > 5, files
    offenders = {
        path.name: name
        for path in files
        for name in _imported_modules(path)
        if name == "train_kernel.train" or name.startswith("train_kernel.train.")
    }
    assert offenders == {}
