"""Typed config records from the plain dicts of a config file: type checks, unknown keys, field docs.

The rules: bool is not an int; an int is fine where a float is expected (stored as float); a dict is fine
where a config dataclass is expected (built recursively, its unknown keys refused); a class may accept a
shorthand (`parallel.pipeline=2` for `dict(size=2)`) through a `from_shorthand` classmethod.

Every value is checked and every derived value computed before a (frozen) section is made (`build`,
which `Section(...)` goes through); nothing is set on a section afterwards.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

from train_kernel.config.errors import ConfigError, unknown_key


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if hint is Any:
        return "any value"
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in typing.get_args(hint))
    if origin is tuple:
        return "a list/tuple"
    if origin in (dict, Mapping):
        return "a dict"
    if dataclasses.is_dataclass(hint):
        shorthand = "an int or " if hasattr(hint, "from_shorthand") else ""
        return f"{shorthand}dict({', '.join(init_fields(hint))})"
    return getattr(hint, "__name__", str(hint))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def check_value(value: Any, hint: Any) -> Any:
    """`value` as the type `hint` asks for (an int made float, a dict built into its dataclass).

    Raises ConfigError (without a key: the caller adds it) when the value does not fit.
    """
    if hint is Any:
        return value
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"expected None, got {_describe(value)}")
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(value, arg)
            except ConfigError as error:
                errors.append(error)
        # A dict meant for a dataclass member: its own (nested) error says more than "expected X or Y".
        nested = [error for error in errors if error.key]
        if nested:
            raise nested[0]
        raise ConfigError(f"expected {type_name(hint)}, got {_describe(value)}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list/tuple, got {_describe(value)}")
        item_hint = args[0] if args else Any
        items = []
        for index, item in enumerate(value):
            try:
                items.append(check_value(item, item_hint))
            except ConfigError as error:
                raise error.within(f"[{index}]") from None
        return tuple(items)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a dict, got {_describe(value)}")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build(hint, value)
        shorthand = getattr(hint, "from_shorthand", None)
        if shorthand is not None:
            result = shorthand(value)
            if result is not None:
                return result
        raise ConfigError(f"expected {type_name(hint)}, got {_describe(value)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"expected True or False, got {_describe(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"expected int, got {_describe(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"expected float (or int), got {_describe(value)}")
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise ConfigError(f"expected {type_name(hint)}, got {_describe(value)}")
    raise TypeError(f"config type {hint!r} is not supported")  # a bug in a config dataclass, not a user error


def build(cls: type, raw: Any) -> Any:
    """An instance of the config dataclass `cls` from the dict `raw` (or `raw` itself if already one).

    The values are checked and normalised *before* the (frozen) instance is made: alternative
    spellings (`cls.prepare_raw`), unknown keys, types, defaults that depend on other fields
    (`cls.derived_fields`); then `check()` runs on the finished instance. Errors carry the dotted key
    below `cls` (the caller adds the section name and the file).
    """
    if isinstance(raw, cls):
        return raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected {type_name(cls)}, got {_describe(raw)}")
    prepare = getattr(cls, "prepare_raw", None)
    if prepare is not None:
        raw = prepare(dict(raw))
    known = init_fields(cls)
    hints = type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        if name not in known:
            raise unknown_key(str(name), known)
        try:
            kwargs[name] = check_value(value, hints[name])
        except ConfigError as error:
            raise error.within(name) from None
    for name, item in known.items():
        if (
            name not in kwargs
            and item.default is dataclasses.MISSING
            and item.default_factory is dataclasses.MISSING
        ):
            raise ConfigError("required, but not given", key=name)
    try:
        instance = type.__call__(cls, **kwargs)  # the dataclass's own __init__, not Section's checks
        if isinstance(instance, Section):
            derived = instance.derived_fields()
            if derived:
                instance = type.__call__(cls, **{**kwargs, **derived})
            instance.check()
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # a plain dataclass (ModelConfig) refusing a value itself
        raise ConfigError(str(error)) from None
    return instance


def replace_checked(instance: Any, **changes: Any) -> Any:
    """`dataclasses.replace` for a value known to be valid: no second round of checks and warnings."""
    values = {name: getattr(instance, name) for name in init_fields(type(instance))}
    return type.__call__(type(instance), **{**values, **changes})


class _Validated(type):
    """Metaclass of Section: `SomeSection(**values)` (in code, and in dataclasses.replace) goes
    through `build`, so it is held to the same rules as a section read from a file."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        names = list(init_fields(cls))
        if len(args) > len(names):
            raise TypeError(f"{cls.__name__} takes at most {len(names)} positional arguments")
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{cls.__name__} got {name!r} twice")
            kwargs[name] = value
        return build(cls, kwargs)


class Section(metaclass=_Validated):
    """Base of the config sections (frozen dataclasses): constructing one checks it (see `build`).

    So a section built in code (a test, the trainer) is held to the same rules as one read from a file,
    and no field is ever set after construction.
    """

    @classmethod
    def prepare_raw(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Rewrites accepted alternative spellings (`zero1=dict(size=8)`) before the type check."""
        return raw

    def derived_fields(self) -> dict[str, Any]:
        """Fields whose default depends on other fields (and normalised members): {name: value}.

        Called on a first instance holding the values as given; the section is then made again
        with these, before `check()`."""
        return {}

    def check(self) -> None:
        """Range and consistency checks; raise ConfigError(message, key=field)."""


def checked_fields(instance: Any) -> dict[str, Any]:
    """The init fields of a dataclass instance whose type check changes them (an int made float, ...),
    as {name: checked value}; raises ConfigError naming the field when one does not fit."""
    hints = type_hints(type(instance))
    changed = {}
    for name in init_fields(type(instance)):
        value = getattr(instance, name)
        try:
            checked = check_value(value, hints[name])
        except ConfigError as error:
            raise error.within(name) from None
        if checked is not value:
            changed[name] = checked
    return changed


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal after the annotation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for statement, following in zip(body, body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def resolve_hint(hint: Any) -> Any:
    """The dataclass inside Optional[...] / Union[int, X], or the hint itself."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg):
                return arg
    return hint


def accepts_str(hint: Any) -> bool:
    if hint is str:
        return True
    return typing.get_origin(hint) in (Union, types.UnionType) and str in typing.get_args(hint)


def accepts_none(hint: Any) -> bool:
    return hint is type(None) or (
        typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint)
    )
