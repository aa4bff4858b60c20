"""Alerts and heartbeats as InternLM's `monitor.alert` sends them, without ever holding up training.

Every alert is appended to `alert_file_path` (one JSON object a line) and POSTed to the webhook,
either in Feishu's bot message format (InternLM's `send_feishu_msg_with_webhook`: msg_type "post",
title and one text paragraph) or as the plain JSON object itself. Heartbeats (the step's metrics,
InternLM's light-monitor "train_metrics" message) go to `light_monitor_address`; only the newest
unsent one is kept. A single background thread does all the I/O with a bounded number of attempts
per message; failures are logged, never raised, and the queue is bounded (overflow is dropped and
counted), so a dead endpoint costs the training loop nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FEISHU = "feishu"
PLAIN_JSON = "json"
FORMATS = (FEISHU, PLAIN_JSON)
# Kinds of alert the trainer sends (the `kind` field; the Feishu title names it too).
KINDS = ("start", "finish", "crash", "rollback", "hang", "loss_spike", "nonfinite_streak")


@dataclass(frozen=True)
class Alert:
    kind: str
    message: str
    job_name: str
    rank: int
    step: int | None = None
    host: str = field(default_factory=socket.gethostname)
    time: float = field(default_factory=time.time)
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        where = f" at step {self.step}" if self.step is not None else ""
        return f"[{self.job_name}] {self.kind}{where}"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "title": self.title}


def feishu_body(alert: Alert) -> dict[str, Any]:
    """Feishu's custom-bot rich-text message (as InternLM sends it): the title, then the message
    with the host and rank, as one text paragraph."""
    text = f"{alert.message}\nhost {alert.host}, rank {alert.rank}"
    if alert.fields:
        text += "\n" + ", ".join(f"{k}={v}" for k, v in alert.fields.items())
    return {
        "timestamp": int(alert.time),
        "msg_type": "post",
        "content": {"post": {"zh_cn": {"title": alert.title, "content": [[{"tag": "text", "text": text}]]}}},
    }


def heartbeat_body(metrics: dict[str, Any]) -> dict[str, Any]:
    """InternLM's light-monitor heartbeat: flat keys of [A-Za-z0-9_] (a nested dict's keys joined
    with '_'), NaN as null, msg_type "train_metrics", and CLUSTER_NAME when the environment has it."""
    data: dict[str, Any] = {}

    def name(key: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", key.split(" ")[0])

    for key, value in metrics.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for inner, item in items:
            if isinstance(item, float) and not math.isfinite(item):
                item = None  # JSON has no NaN; InternLM sends None too
            data[name(f"{key}_{inner}" if inner is not None else str(key))] = item
    if os.getenv("CLUSTER_NAME"):
        data["cluster"] = os.environ["CLUSTER_NAME"]
    data["msg_type"] = "train_metrics"
    return data


@dataclass
class _Message:
    url: str | None
    body: dict[str, Any] | None
    line: str | None = None  # for the alert file
    what: str = "alert"


class AlertSender:
    """Sends alerts and heartbeats from a daemon thread. `alert` and `heartbeat` only queue;
    `flush` waits (bounded) for what is queued, e.g. before a hang exit."""

    def __init__(
        self,
        job_name: str,
        rank: int = 0,
        webhook: str | None = None,
        webhook_format: str = FEISHU,
        heartbeat_url: str | None = None,
        alert_file: str | os.PathLike | None = None,
        attempts: int = 3,
        timeout_s: float = 5.0,
        backoff_s: float = 1.0,
        max_queue: int = 1000,
        log_level: int = logging.WARNING,
    ) -> None:
        if webhook_format not in FORMATS:
            raise ValueError(f"webhook format {webhook_format!r} is not one of {FORMATS}")
        self.job_name = job_name
        self.rank = rank
        self.webhook = webhook
        self.webhook_format = webhook_format
        self.heartbeat_url = heartbeat_url
        self.alert_file = Path(alert_file) if alert_file else None
        self.attempts = max(1, attempts)
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.log_level = log_level  # how `alert` logs what it sends (ranks other than 0: DEBUG)
        self.dropped = 0
        self.failed = 0
        self.sent: list[Alert] = []  # every alert queued, for the trainer's summary and tests
        self._queue: queue.Queue[_Message | None] = queue.Queue(maxsize=max_queue)
        self._heartbeat: dict[str, Any] | None = None  # the newest unsent heartbeat only
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._busy = 0
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="alert-sender", daemon=True)
        self._thread.start()

    @property
    def enabled(self) -> bool:
        return bool(self.webhook or self.heartbeat_url or self.alert_file)

    def alert(self, kind: str, message: str, step: int | None = None, **fields: Any) -> Alert:
        """Queues one alert (never blocks; logged at warning level here as well)."""
        alert = Alert(kind, message, self.job_name, self.rank, step, fields=fields)
        self.sent.append(alert)
        # start and finish are news, not trouble: they must not read as warnings in every run's log
        level = min(self.log_level, logging.INFO) if kind in ("start", "finish") else self.log_level
        log.log(level, "alert %s: %s", kind, message)
        line = json.dumps(alert.to_json(), default=str)
        body = feishu_body(alert) if self.webhook_format == FEISHU else alert.to_json()
        if self.alert_file or self.webhook:
            self._put(_Message(self.webhook, body, line, what=f"alert {kind}"))
        return alert

    def heartbeat(self, metrics: dict[str, Any]) -> None:
        """Replaces the pending heartbeat with this one (the monitor wants the latest, not a backlog)."""
        if not self.heartbeat_url:
            return
        with self._lock:
            pending = self._heartbeat is not None
            self._heartbeat = heartbeat_body(metrics)
        if not pending:
            self._put(_Message(None, None, what="heartbeat"))

    def _put(self, message: _Message) -> None:
        with self._lock:
            if self._closed:
                return
            self._busy += 1
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            with self._lock:
                self._busy -= 1
                self._idle.notify_all()
            self.dropped += 1
            log.warning("alerts: queue full, %s dropped (%d so far)", message.what, self.dropped)

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits up to `timeout_s` for everything queued; True when nothing is left."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Sends what is queued (waiting at most `timeout_s`), then stops the thread."""
        if not self.flush(timeout_s):
            log.warning("alerts: %d messages still unsent after %.0f s; given up", self._busy, timeout_s)
        with self._lock:
            self._closed = True
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the thread is a daemon: it ends with the process

    def _work(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            try:
                self._deliver(message)
            except Exception as error:  # noqa: BLE001 - a sender bug must not end alerting
                log.warning("alerts: %s not sent: %s", message.what, error)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._idle.notify_all()

    def _deliver(self, message: _Message) -> None:
        if message.what == "heartbeat":
            with self._lock:
                body, self._heartbeat = self._heartbeat, None
            if body is not None:
                self._post(self.heartbeat_url, body, message.what)
            return
        if message.line is not None and self.alert_file is not None:
            try:
                self.alert_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self.alert_file, "a", encoding="utf-8") as handle:
                    handle.write(message.line + "\n")
            except OSError as error:
                log.warning("alerts: cannot append to %s: %s", self.alert_file, error)
        if message.url:
            self._post(message.url, message.body, message.what)

    def _post(self, url: str, body: dict[str, Any], what: str) -> bool:
        data = json.dumps(body, default=str).encode("utf-8")
        error: Exception | None = None
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(
                url, data=data, headers={"Content-Type": "application/json;charset=utf-8"}, method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
                return True
            except urllib.error.HTTPError as failure:
                error = failure
                if 400 <= failure.code < 500 and failure.code != 429:
                    break  # the endpoint refuses this message: another attempt would too
            except (OSError, ValueError) as failure:  # URLError, timeouts, refused connections
                error = failure
        self.failed += 1
        log.warning("alerts: %s to %s failed after %d attempt(s): %s", what, _shown(url), attempt + 1, error)
        return False


def _shown(url: str) -> str:
    """A webhook URL without its path (Feishu's path is the bot's secret token)."""
    match = re.match(r"^([a-z]+://[^/]+)", url)
    return (match.group(1) + "/...") if match else "<webhook>"
