"""Reading an InternLM Python config file: execute it, apply overrides, build the TrainConfig.

The file is executed one top-level statement at a time. Overrides ("data.total_steps=100",
"SEQ_LEN=4096") are applied right after the statement that binds their top-level name, so values the
file derives later (`lr_scheduler = dict(total_steps=data["total_steps"])`, `seq_len=SEQ_LEN`) follow
the override, as if the user had edited the file.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import logging
import types
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from train_kernel.config.errors import ConfigError, did_you_mean, unknown_key
from train_kernel.config.notices import log_notices
from train_kernel.config.pack_agreement import check_pack_agreement
from train_kernel.config.train_config import INTERNAL_FIELDS, TrainConfig
from train_kernel.config.typecheck import (
    accepts_none,
    accepts_str,
    build,
    init_fields,
    resolve_hint,
    type_hints,
)

logger = logging.getLogger("train_kernel.config")

# Top-level values that are tools of the file, not settings: `import os`, `from math import ceil`, `def f()`.
IGNORED_TYPES = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, type)
_MISSING = object()


def top_level_keys() -> dict[str, Any]:
    """Lowercase top-level names a config file may bind, with their types."""
    hints = type_hints(TrainConfig)
    return {name: hints[name] for name in init_fields(TrainConfig) if name not in INTERNAL_FIELDS}


@dataclasses.dataclass(frozen=True)
class Override:
    """One `--set key=value`: the dotted key split into parts, and the parsed value."""

    text: str
    parts: tuple[str, ...]
    value: Any

    @property
    def key(self) -> str:
        return ".".join(self.parts)

    @property
    def is_constant(self) -> bool:
        return self.parts[0].isupper()


def parse_value(raw: str, hint: Any = Any) -> Any:
    """`ast.literal_eval(raw)`, else the raw string; for a string-typed key the raw text stays a string
    (so "data.skip_batches=3,5" is the string "3,5", not the tuple (3, 5))."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return raw
    if accepts_str(hint) and not isinstance(value, str) and not (value is None and accepts_none(hint)):
        return raw
    return value


def parse_override(text: str, source: str) -> Override:
    """Checks the key of "key=value" against the config schema and parses the value."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    where = f"{source}: override {text!r}"
    if not sep or not key:
        raise ConfigError("expected key=value, e.g. data.total_steps=100", source=where)
    parts = tuple(key.split("."))
    if any(part == "" for part in parts):
        raise ConfigError("empty part in the dotted key", key=key, source=where)
    if parts[0].isupper():
        if len(parts) > 1:
            raise ConfigError("an UPPERCASE constant has no sub-keys", key=key, source=where)
        return Override(text, parts, parse_value(raw.strip()))
    keys = top_level_keys()
    if parts[0] not in keys:
        raise unknown_key(parts[0], keys).within(source=where)
    hint = keys[parts[0]]
    for depth, part in enumerate(parts[1:], start=1):
        cls = resolve_hint(hint)
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{'.'.join(parts[:depth])} is a value, not a section", key=key, source=where)
        known = init_fields(cls)
        if part not in known:
            raise ConfigError(
                f"unknown key{did_you_mean(part, known)}", key=".".join(parts[: depth + 1]), source=where
            )
        hint = type_hints(cls)[part]
    return Override(text, parts, parse_value(raw.strip(), hint))


def _assign(container: MutableMapping, override: Override, source: str) -> None:
    """Sets override.parts[1:] inside the top-level dict `container` (creating missing sub-dicts)."""
    hint = top_level_keys()[override.parts[0]]
    for depth, part in enumerate(override.parts[1:-1], start=1):
        cls = resolve_hint(hint)
        hint = type_hints(cls)[part]
        child = container.get(part, _MISSING)
        if child is _MISSING or child is None:
            child = {}
        elif not isinstance(child, Mapping):
            shorthand = getattr(resolve_hint(hint), "from_shorthand", None)
            expanded = shorthand(child) if shorthand is not None else None
            if expanded is None:
                raise ConfigError(
                    f"cannot set it: {'.'.join(override.parts[: depth + 1])} is {child!r} in the file, "
                    "not a dict",
                    key=override.key,
                    source=f"{source}: override {override.text!r}",
                )
            child = dataclasses.asdict(expanded)
        elif not isinstance(child, MutableMapping):
            child = dict(child)
        container[part] = child
        container = child
    container[override.parts[-1]] = override.value


def _apply(namespace: dict[str, Any], name: str, overrides: list[Override], source: str) -> None:
    for override in overrides:
        if len(override.parts) == 1:
            namespace[name] = override.value
            continue
        section = namespace.get(name, _MISSING)
        if section is _MISSING or section is None:
            section = namespace[name] = {}
        if not isinstance(section, MutableMapping):
            raise ConfigError(
                f"cannot set it: {name} is {type(section).__name__} in the file, not a dict",
                key=override.key,
                source=f"{source}: override {override.text!r}",
            )
        _assign(section, override, source)


def _assigned_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for statement in tree.body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return names


def _error_line(error: BaseException, source: str, fallback: int) -> int:
    line = fallback
    trace = error.__traceback__
    while trace is not None:
        if trace.tb_frame.f_code.co_filename == source:
            line = trace.tb_lineno
        trace = trace.tb_next
    return line


def execute(text: str, source: str, overrides: Sequence[Override] = ()) -> dict[str, Any]:
    """Runs the config file's code and returns its namespace, with the overrides applied."""
    try:
        tree = ast.parse(text, filename=source)
    except SyntaxError as error:
        raise ConfigError(f"syntax error: {error.msg}", source=f"{source}:{error.lineno}") from None
    assigned = _assigned_names(tree)
    for override in overrides:
        name = override.parts[0]
        if override.is_constant and name != "JOB_NAME" and name not in assigned:
            constants = sorted(n for n in assigned if n.isupper())
            raise ConfigError(
                f"the file defines no constant {name}{did_you_mean(name, constants)}",
                key=name,
                source=f"{source}: override {override.text!r}",
            )
    by_name: dict[str, list[Override]] = {}
    for override in overrides:
        by_name.setdefault(override.parts[0], []).append(override)

    namespace: dict[str, Any] = {"__name__": "__config__", "__file__": source, "__builtins__": builtins}
    seen: dict[str, Any] = {name: _MISSING for name in by_name}
    for statement in tree.body:
        code = compile(ast.Module(body=[statement], type_ignores=[]), source, "exec")
        try:
            exec(code, namespace)  # noqa: S102 - executing the config file is the format (as InternLM does)
        except (Exception, SystemExit) as error:
            line = _error_line(error, source, statement.lineno)
            raise ConfigError(f"{type(error).__name__}: {error}", source=f"{source}:{line}") from None
        for name, pending in by_name.items():
            current = namespace.get(name, _MISSING)
            if current is not _MISSING and current is not seen[name]:
                _apply(namespace, name, pending, source)
                seen[name] = namespace[name]
    # Once more at the end: the override also wins over a later in-place edit (`data["seq_len"] = 8`),
    # and creates what the file never wrote (a section left to its defaults, JOB_NAME).
    for name, pending in by_name.items():
        _apply(namespace, name, pending, source)
    return namespace


def build_config(
    namespace: Mapping[str, Any], source: str, path: Path | None = None, text: str = ""
) -> TrainConfig:
    """TrainConfig from the top-level names of an executed config file."""
    keys = top_level_keys()
    settings: dict[str, Any] = {}
    constants: dict[str, Any] = {}
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, IGNORED_TYPES):
            continue
        if name.isupper():
            constants[name] = value
        elif name in keys:
            settings[name] = value
        else:
            raise unknown_key(name, keys).within(source=source)
    job_name = constants.get("JOB_NAME", path.stem if path is not None else "train")
    if not isinstance(job_name, str):
        raise ConfigError(
            f"expected a string, got {type(job_name).__name__} {job_name!r}", key="JOB_NAME", source=source
        )
    raw = {**settings, "job_name": job_name, "constants": constants, "source_path": path, "source_text": text}
    try:
        config = build(TrainConfig, raw)
        check_pack_agreement(config.data)
    except ConfigError as error:
        raise error.within(source=source) from None
    log_notices(config, settings, source, logger)
    return config


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads, executes and validates an InternLM config file; `overrides` are "dotted.key=value" strings
    (value parsed with ast.literal_eval, else kept as a string).

    Raises ConfigError naming the file and the dotted key."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such config file", source=source) from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as error:
        raise ConfigError(f"cannot read the config file: {error}", source=source) from None
    parsed = [parse_override(item, source) for item in overrides]
    namespace = execute(text, source, parsed)
    return build_config(namespace, source, path, text)


def config_from_text(text: str, overrides: Iterable[str] = (), source: str = "<config>") -> TrainConfig:
    """The same as load_config for config code held in a string (tests, configs saved in checkpoints)."""
    parsed = [parse_override(item, source) for item in overrides]
    return build_config(execute(text, source, parsed), source, None, text)


__all__ = ["Override", "build_config", "config_from_text", "execute", "load_config", "parse_override"]
