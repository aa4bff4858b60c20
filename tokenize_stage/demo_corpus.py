"""A real-text demo corpus that needs no download: the Python standard library of the running
interpreter, its sources as ``code`` and its docstrings as ``en``.

Deterministic for a given Python installation: files are visited in sorted order.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo"}


@dataclass(frozen=True)
class DemoCorpusSummary:
    code_documents: int
    code_bytes: int
    en_documents: int
    en_bytes: int


def _stdlib_sources() -> Iterator[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if not _SKIPPED_FOLDERS.intersection(path.relative_to(root).parts):
            yield path


def _docstrings(source: str) -> Iterator[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return  # a few stdlib test files are deliberately invalid Python
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text and len(text) >= 40:
                yield text


def build_demo_corpus(output: Path, max_bytes_per_type: int = 8 << 20) -> DemoCorpusSummary:
    """Writes ``<output>/code/stdlib.jsonl`` and ``<output>/en/docstrings.jsonl`` (field
    ``content``), each capped at ``max_bytes_per_type`` of text. Rewrites them only when their
    content would change, so tokenize-stage's resume sees them as unchanged."""
    code: list[str] = []
    en: list[str] = []
    code_bytes = en_bytes = 0
    for path in _stdlib_sources():
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if code_bytes < max_bytes_per_type:
            code.append(source)
            code_bytes += len(source.encode())
        if en_bytes < max_bytes_per_type:
            for text in _docstrings(source):
                en.append(text)
                en_bytes += len(text.encode())
        if code_bytes >= max_bytes_per_type and en_bytes >= max_bytes_per_type:
            break
    _write_jsonl(output / "code" / "stdlib.jsonl", code)
    _write_jsonl(output / "en" / "docstrings.jsonl", en)
    return DemoCorpusSummary(len(code), code_bytes, len(en), en_bytes)


def _write_jsonl(path: Path, texts: list[str]) -> None:
    data = "".join(json.dumps({"content": text}, ensure_ascii=False) + "\n" for text in texts).encode()
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
