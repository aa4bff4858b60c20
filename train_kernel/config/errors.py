"""The one exception type of the config system: a user error that names the file and the key."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A config file (or an override) that cannot be used as it is.

    `str(error)` reads "<file>: <dotted.key>: <what is wrong>"; `key` and `source` are also kept apart
    so that callers can add the part they know (a section builder knows the section, the loader the file).
    """

    def __init__(self, message: str, key: str | None = None, source: str | None = None) -> None:
        self.message = message
        self.key = key
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [part for part in (self.source, self.key) if part]
        return ": ".join([*parts, self.message])

    def within(self, prefix: str | None = None, source: str | None = None) -> ConfigError:
        """The same error one level up: `prefix` goes before the key, `source` is set if not yet known."""
        key = self.key
        if prefix:
            key = f"{prefix}.{key}" if key else prefix
        return type(self)(self.message, key=key, source=self.source or source)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """'; did you mean X?' for the closest candidate, or '' (difflib's similarity, cutoff 0.6)."""
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def unknown_key(name: str, candidates: Iterable[str], key: str | None = None) -> ConfigError:
    return ConfigError(f"unknown key{did_you_mean(name, candidates)}", key=key or name)
