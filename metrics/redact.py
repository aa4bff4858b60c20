"""Credentials in tracking URIs: kept out of everything the metrics service writes or prints.

A tracking URI may carry a secret: `http://user:password@host:5000`, a token as the user
(`https://TOKEN@host`), a token in the query string (`...?token=...`), or a database password
(`postgresql://user:password@host/db`). Whatever is shown or stored shows the URI redacted: the
password (or a user without a password) and every query value become `***`
(`http://user:***@host:5000`, `http://host:5000/?token=***`).

stdlib only: the trainer's emitter uses it too.
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that are an MLflow tracking token (sent as a bearer token: MLFLOW_TRACKING_TOKEN).
TOKEN_PARAMS = ("token", "access_token")
# Credentials inside free text (a config file, a message): `scheme://user:password@` and query
# values of parameters named like secrets.
_USERINFO_IN_TEXT = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:'\"]*):[^\s/@'\"]*@")
_SECRET_QUERY_IN_TEXT = re.compile(
    r"([?&](?:[A-Za-z_]*token|password|passwd|secret|api_?key|key|sig|signature|auth)=)[^&#\s'\"]+",
    re.IGNORECASE,
)


def _split(uri: str):
    """urlsplit for URIs with a host part (`scheme://...`), else None."""
    if "://" not in uri:
        return None
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - evaluated for its errors (a malformed port)
    except ValueError:
        return None
    return parts if parts.scheme and parts.netloc else None


def has_credentials(uri: str) -> bool:
    parts = _split(uri)
    return parts is not None and ("@" in parts.netloc or bool(parts.query))


def redact_uri(uri: str) -> str:
    """The URI with its password (or token-as-user) and query values replaced by `***`; a URI
    without credentials comes back unchanged."""
    parts = _split(uri)
    if parts is None or not has_credentials(uri):
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if sep else f"{MASK}@{host}"
    query = "&".join(f"{key}={MASK}" for key, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Free text with the given secrets and anything that looks like URI credentials masked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    text = _USERINFO_IN_TEXT.sub(lambda m: f"{m.group(1)}:{MASK}@", text)
    return _SECRET_QUERY_IN_TEXT.sub(lambda m: m.group(1) + MASK, text)


def redact_values(value: Any) -> Any:
    """A params/tags structure with the credentials in its strings masked (redact_text: a URI's
    password, query values named like secrets)."""
    if isinstance(value, dict):
        return {key: redact_values(inner) for key, inner in value.items()}
    if isinstance(value, list):
        return [redact_values(inner) for inner in value]
    if isinstance(value, str) and ("://" in value or "=" in value):
        return redact_text(value)
    return value


@dataclass(frozen=True)
class TrackingUri:
    """A tracking URI split into what the MLflow client is given, what may be shown and stored,
    and the secrets that must appear nowhere.

    For http(s) the user and password go to MLflow as MLFLOW_TRACKING_USERNAME / _PASSWORD and a
    `token` / `access_token` query value as MLFLOW_TRACKING_TOKEN (MLflow reads these; it would
    put a query string in front of its API path), so the client's URI holds no secret and neither
    do MLflow's own messages. Other schemes (a database URL) keep their credentials in the
    client's URI: there is no other way to pass them."""

    client_uri: str
    display: str
    env: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()

    @classmethod
    def parse(cls, uri: str) -> TrackingUri:
        parts = _split(uri)
        if parts is None or not has_credentials(uri):
            return cls(uri, uri)
        secrets: list[str] = []
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, netloc_host = netloc.rsplit("@", 1)
            user, sep, password = userinfo.partition(":")
            # The secret as written and decoded (a password with `@` or `:` is percent-encoded).
            secrets += [password, unquote(password)] if sep else [user, unquote(user)]
        else:
            user, sep, password, netloc_host = "", "", "", netloc
        query = parse_qsl(parts.query, keep_blank_values=True)
        secrets += [value for _, value in query] + [quote(value, safe="") for _, value in query]
        secrets = sorted({s for s in secrets if len(s) >= 3}, key=len, reverse=True)
        env: dict[str, str] = {}
        client_uri = uri
        if parts.scheme in ("http", "https"):
            if "@" in netloc:
                if sep:
                    env["MLFLOW_TRACKING_USERNAME"] = unquote(user)
                    env["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
                else:
                    env["MLFLOW_TRACKING_TOKEN"] = unquote(user)
            kept = []
            for key, value in query:
                if key.lower() in TOKEN_PARAMS:
                    env["MLFLOW_TRACKING_TOKEN"] = value
                else:
                    kept.append((key, value))
            client_uri = urlunsplit((parts.scheme, netloc_host, parts.path, urlencode(kept), parts.fragment))
        return cls(client_uri, redact_uri(uri), env, tuple(secrets))

    def scrub(self, text: str) -> str:
        """Text (a log line, a param value, a file) with this URI's secrets masked."""
        return redact_text(text, self.secrets)


class _ScrubbedStream(io.TextIOBase):
    """A text stream that masks secrets in what is written through it."""

    def __init__(self, inner: TextIO, scrub: Callable[[str], str]) -> None:
        self.inner = inner
        self.scrub = scrub

    def write(self, text: str) -> int:
        self.inner.write(self.scrub(text))
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return self.inner.isatty()


def scrub_output(scrub: Callable[[str], str]) -> None:
    """Everything this process prints from Python (its log lines, MLflow's, warnings and
    tracebacks, all of which go to the sidecar's log) passes `scrub` first."""
    import logging

    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = _ScrubbedStream(old_out, scrub)
    sys.stderr = _ScrubbedStream(old_err, scrub)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (old_out, old_err):
            handler.setStream(sys.stderr if handler.stream is old_err else sys.stdout)
