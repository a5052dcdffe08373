"""
What the server tells its operators: one access line per request or ask,
in text or as one JSON object a line, and Prometheus metrics.

Prompts and answers never reach the log unless C{log_content} is set; API
keys never do (only their names).
"""

from __future__ import annotations

import json
import time
from typing import IO, Any

from attrs import define, field, fields, frozen
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    formatEvent,
)

log = Logger(namespace="easybackend.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@frozen
class AccessRecord:
    """
    One finished request or ask, as the access log and metrics see it.

    @ivar status: C{"ok"}, C{"cancelled"}, or the error code.
    @ivar first_piece: seconds until the first piece of the answer was
        passed on (asks only).
    """

    transport: str
    kind: str
    status: str
    latency: float
    request_id: str | None = None
    conversation_id: str | None = None
    key: str | None = None
    first_piece: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    upstream_status: int | None = None
    retries: int | None = None
    prompt: str | None = field(default=None, repr=False)
    answer: str | None = field(default=None, repr=False)


#: the access line's fields, in order (read one by one: C{attrs.asdict}
#: costs several times more, once per ask)
_FIELDS = tuple(a.name for a in fields(AccessRecord))


class Metrics:
    """The Prometheus metrics of one server, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "easybackend_requests", "Requests and asks by transport, kind and status",
            ["transport", "kind", "status"], registry=r)
        self.ask_latency = Histogram(
            "easybackend_ask_seconds", "Whole ask latency", ["transport"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.first_piece = Histogram(
            "easybackend_ask_first_piece_seconds", "Time to the first piece of an answer",
            ["transport"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter(
            "easybackend_tokens", "Tokens in and out, as the upstream counted them",
            ["direction"], registry=r)
        self.upstream_errors = Counter(
            "easybackend_upstream_errors", "Asks the upstream failed", ["code"], registry=r)
        self.upstream_retries = Counter(
            "easybackend_upstream_retries", "Upstream retries", registry=r)
        self.in_flight = Gauge(
            "easybackend_asks_in_flight", "Asks being answered now", registry=r)


@define
class Observer:
    """Writes access lines and keeps the metrics."""

    metrics: Metrics = field(factory=Metrics)
    log_content: bool = False

    def record(self, record: AccessRecord) -> None:
        """Log one finished request or ask and count it."""
        fields = {name: value for name in _FIELDS
                  if (value := getattr(record, name)) is not None}
        if not self.log_content:
            fields.pop("prompt", None)
            fields.pop("answer", None)
        text = " ".join(f"{k}={_show(v)}" for k, v in fields.items())
        log.info("{access_text}", access_text=text, access=fields)
        m = self.metrics
        m.requests.labels(record.transport, record.kind, record.status).inc()
        if record.kind in ("ask", "completion"):
            m.ask_latency.labels(record.transport).observe(record.latency)
            if record.first_piece is not None:
                m.first_piece.labels(record.transport).observe(record.first_piece)
            if record.tokens_in:
                m.tokens.labels("in").inc(record.tokens_in)
            if record.tokens_out:
                m.tokens.labels("out").inc(record.tokens_out)
            if record.status.startswith("upstream_"):
                m.upstream_errors.labels(record.status).inc()
            if record.retries:
                m.upstream_retries.inc(record.retries)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    if isinstance(value, str) and (" " in value or not value):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def json_line(event: dict[str, Any]) -> str:
    """One log event as one JSON object on one line."""
    out: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", 0)))
        + f".{int((event.get('log_time', 0) % 1) * 1000):03d}Z",
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
    }
    access = event.get("access")
    if isinstance(access, dict):
        out.update(access)
        out["message"] = "access"
    else:
        out["message"] = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            out["traceback"] = failure.getTraceback()
    return json.dumps(out, ensure_ascii=False, default=str) + "\n"


def json_observer(stream: IO[str]) -> ILogObserver:
    """A log observer writing L{json_line}s to C{stream}."""
    return FileLogObserver(stream, json_line)
