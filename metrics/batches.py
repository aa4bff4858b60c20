"""log_batch requests within MLflow's limits, and what happens when MLflow refuses one.

Records are packed into requests of at most 1000 entities (100 params + tags). A request MLflow
refuses with a 4xx (not one of the waited-on statuses, see mlflow_run.is_transient) commits
nothing, so its records are sent again one by one: a record refused on its own is reported with
its line number and skipped, and its step sentinel is still logged (alone), so that the step
counts as forwarded and a restarted sidecar does not send it again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from metrics.emitter import METRICS_FILE
from metrics.mlflow_run import MlflowRun, describe, is_refused
from metrics.records import MAX_INT64, Record

log = logging.getLogger(__name__)


@dataclass
class Part:
    """What one request carries of one record."""

    record: Record
    metrics: list = field(default_factory=list)
    params: list = field(default_factory=list)
    tags: list = field(default_factory=list)
    sentinel: object | None = None  # the record's step sentinel (a Metric), when it is in this part


@dataclass
class Request:
    parts: list[Part] = field(default_factory=list)

    def entities(self, kind: str) -> list:
        return [item for part in self.parts for item in getattr(part, kind)]

    def size(self) -> int:
        return sum(len(p.metrics) + len(p.params) + len(p.tags) for p in self.parts)

    def params_tags(self) -> int:
        return sum(len(p.params) + len(p.tags) for p in self.parts)

    def part(self, record: Record) -> Part:
        if not self.parts or self.parts[-1].record is not record:
            self.parts.append(Part(record))
        return self.parts[-1]


class Batcher:
    def __init__(self) -> None:
        from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

        self.max_entities = MAX_ENTITIES_PER_BATCH
        self.max_params_tags = MAX_PARAMS_TAGS_PER_BATCH
        self.requests: list[Request] = [Request()]

    def _room(self, metrics: int = 0, params_tags: int = 0) -> Request:
        current = self.requests[-1]
        if current.size() + metrics + params_tags > self.max_entities or (
            params_tags and current.params_tags() + params_tags > self.max_params_tags
        ):
            current = Request()
            self.requests.append(current)
        return current

    def add_metrics(self, record: Record, metrics: list, sentinel) -> None:
        """A record's metrics and its step sentinel (last) go into one request when they fit in
        one, so that the sentinel is committed together with them."""
        metrics = [*metrics, sentinel]
        if len(metrics) > self.max_entities:  # more fields than one request holds: split, sentinel last
            for start in range(0, len(metrics), self.max_entities):
                chunk = metrics[start : start + self.max_entities]
                self._room(metrics=self.max_entities).part(record).metrics.extend(chunk)
        else:
            self._room(metrics=len(metrics)).part(record).metrics.extend(metrics)
        self.requests[-1].parts[-1].sentinel = sentinel

    def add_param(self, record: Record, param) -> None:
        self._room(params_tags=1).part(record).params.append(param)

    def add_tag(self, record: Record, tag) -> None:
        self._room(params_tags=1).part(record).tags.append(tag)

    def nonempty(self) -> list[Request]:
        return [r for r in self.requests if r.size()]


def send(run: MlflowRun, batcher: Batcher, on_refused: Callable[[Record], None]) -> None:
    """Sends every request; the records of a refused one one by one (see the module docstring)."""
    for request in batcher.nonempty():
        try:
            run.log_batch(request.entities("metrics"), request.entities("params"), request.entities("tags"))
        except Exception as exc:
            if not is_refused(exc):
                raise
            if len(request.parts) == 1:
                _refused(run, request.parts[0], exc, on_refused)
                continue
            log.info("MLflow refused a batch (%s); sending its records one by one", describe(exc))
            for part in request.parts:
                try:
                    run.log_batch(part.metrics, part.params, part.tags)
                except Exception as exc_part:
                    if not is_refused(exc_part):
                        raise
                    _refused(run, part, exc_part, on_refused)


def _refused(run: MlflowRun, part: Part, exc: BaseException, on_refused: Callable[[Record], None]) -> None:
    log.warning(
        "%s:%d: MLflow refused this %s record (%s); skipped",
        METRICS_FILE,
        part.record.line,
        part.record.kind,
        describe(exc),
    )
    on_refused(part.record)
    if part.sentinel is None:
        return
    from mlflow.entities import Metric

    # Alone, with a timestamp MLflow takes (the record's own may be why it was refused).
    sentinel = part.sentinel
    timestamp = min(max(sentinel.timestamp, 0), MAX_INT64)
    try:
        run.log_batch([Metric(sentinel.key, sentinel.value, timestamp, sentinel.step)], [], [])
    except Exception as exc_sentinel:
        if not is_refused(exc_sentinel):
            raise
        log.warning(
            "%s:%d: MLflow refused the step marker too (%s)",
            METRICS_FILE,
            part.record.line,
            describe(exc_sentinel),
        )
