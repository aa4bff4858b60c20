"""Metric, param and tag names as MLflow accepts them.

MLflow refuses (HTTP 400) a name with a character outside letters, digits, `_`, `-`, `.`, space and
`/` (a colon too on Windows servers), a name that is not a clean relative path (`a//b`, `./a`,
`..x`, `/a`) and one over 250 characters. The trainer's names come from its data (`loss/<type>`
for every type folder, so `loss/c++`), so the sidecar maps every name, deterministically:

1. each refused character becomes `_` and its code point in upper-case hex, at least two digits
   (`loss/c++` -> `loss/c_2B_2B`, `a:b` -> `a_3Ab`, `x€` -> `x_20AC`);
2. each `/`-separated part that is empty or starts with a dot gets a leading `_`
   (`a//b` -> `a/_/b`, `.x` -> `_.x`, empty name -> `_`);
3. a name still over 250 characters keeps its first 241 and ends with `-` and the first 8 hex
   digits of the SHA-1 of the original name (so two long names stay apart).

Names MLflow accepts already are left as they are.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_NAME_LENGTH = 250  # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
# What MLflow accepts on every platform (its own rule, without the colon that Windows refuses).
_ALLOWED = re.compile(r"[/\w.\- ]")


def mlflow_name(name: str) -> str:
    """`name` as MLflow accepts it (see the module docstring for the mapping)."""
    text = "".join(ch if _ALLOWED.fullmatch(ch) else f"_{ord(ch):02X}" for ch in name)
    text = "/".join("_" + part if part == "" or part.startswith(".") else part for part in text.split("/"))
    if len(text) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        text = text[: MAX_NAME_LENGTH - 9] + "-" + digest
    return text


class Names:
    """mlflow_name with a memory: each renamed name is reported once (a log line), and two
    fields of one record that map to the same name keep the first (the other is reported)."""

    def __init__(self, reserved: frozenset[str] = frozenset()) -> None:
        self.reserved = reserved  # the sidecar's own keys: a record field must not overwrite them
        self._seen: dict[str, str] = {}

    def name(self, name: str) -> str:
        mapped = self._seen.get(name)
        if mapped is None:
            mapped = self._seen[name] = mlflow_name(name)
            if mapped != name:
                log.info("%r is logged to MLflow as %r (a name MLflow refuses)", name, mapped)
        return mapped

    def mapped(self, items: dict[str, T], where: str) -> dict[str, T]:
        """The entries under their MLflow names; `where` (file:line) names the record in reports."""
        out: dict[str, T] = {}
        for key, value in items.items():
            name = self.name(key)
            if name in out or name in self.reserved:
                log.warning("%s: field %r is logged as %r, a name already taken; skipped", where, key, name)
                continue
            out[name] = value
        return out
