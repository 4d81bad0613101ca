"""OpenTelemetry traces of the server, when the standard OTEL_* variables ask for them. Off by default.

`configure()` runs once in every process (web servers, Celery, management
commands: `CoordinationConfig.ready`). With `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, or `OTEL_TRACES_EXPORTER=otlp|console`,
it installs the SDK's TracerProvider: spans go out in batches through OTLP
http/protobuf, whose exporter reads the other standard variables itself
(headers, timeout, compression; `OTEL_TRACES_SAMPLER`, `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`). Otherwise the SDK is not even imported, and
`tracer` stays None: the request middleware leaves itself out of the chain and
every other caller checks that one name first.

Spans that stand for work spread over several requests (a workflow, a step's
attempt from lease to report) are made when that work ends, with the times it
started and ended. Their ids are derived from AgentManager's own ids, so no
state is kept for them and anyone can name them in advance: the trace id is the
workflow's id (one trace per workflow), the span ids come from the workflow's
and the attempt's ids (`derived_span_id`). A lease hands its attempt's span
context to the worker as a W3C `traceparent`; the worker's spans hang under it.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from typing import Any
from uuid import UUID

from django.core.exceptions import ImproperlyConfigured

from agents import telemetry as worker_telemetry  # one reading of the OTEL_* variables for server and workers

logger = logging.getLogger(__name__)

SERVICE_NAME = "agentmanager"

# The tracer AgentManager's spans are made with; None while tracing is off.
tracer: Any = None
_provider: Any = None

# The ids the next span made in this context must take (see `span_with_ids`); None for random ones.
_forced_ids: ContextVar[tuple[int | None, int] | None] = ContextVar("am_forced_span_ids", default=None)


class DerivedIds:
    """The SDK's id generator: random ids, except for a span made by `span_with_ids`."""

    def generate_span_id(self) -> int:
        forced = _forced_ids.get()
        return forced[1] if forced is not None else random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        forced = _forced_ids.get()
        if forced is not None and forced[0] is not None:
            return forced[0]
        return random.getrandbits(128) or 1

    def is_trace_id_random(self) -> bool:
        return False  # a workflow's trace id is its UUID: not 56 random bits where W3C's flag says so


def configure(environ: Mapping[str, str], *, exporter: Any = None, install_global: bool = True) -> bool:
    """Start tracing if `environ` asks for it (or with `exporter`, a SpanExporter, for tests); whether it is on.

    A variable asking for what cannot be done stops start-up (ImproperlyConfigured).
    """
    global tracer, _provider
    if exporter is None:
        try:
            wanted = worker_telemetry.traces_wanted(environ)
        except worker_telemetry.TelemetryConfigError as exc:
            raise ImproperlyConfigured(str(exc)) from None
        if wanted is None:
            return False
        provider = worker_telemetry.make_provider(wanted, service_name=SERVICE_NAME, id_generator=DerivedIds())
    else:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}),
                                  id_generator=DerivedIds(), shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if install_global:
        from opentelemetry import trace

        trace.set_tracer_provider(provider)
    _provider = provider
    tracer = provider.get_tracer("agentmanager")
    return True


def unconfigure() -> None:
    """Stop tracing (tests): flush what was made, make no more spans."""
    global tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    tracer = _provider = None


def derived_span_id(kind: str, id: UUID) -> int:
    """A span id that stands for one thing (`kind` "workflow" or "attempt", and its id), never 0."""
    digest = hashlib.blake2b(f"am.{kind}:".encode() + id.bytes, digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


def workflow_trace_id(workflow_id: UUID) -> int:
    return workflow_id.int or 1


def traceparent(workflow_id: UUID, span_id: int) -> str:
    """W3C trace context of a span in a workflow's trace (sampled)."""
    return f"00-{workflow_trace_id(workflow_id):032x}-{span_id:016x}-01"


def workflow_context(workflow_id: UUID) -> Any:
    """An OpenTelemetry Context whose parent is the workflow's root span, made or not yet."""
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    parent = SpanContext(trace_id=workflow_trace_id(workflow_id), span_id=derived_span_id("workflow", workflow_id),
                         is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent))


def span_with_ids(name: str, *, span_id: int, trace_id: int | None = None, context: Any = None,
                  start: datetime, end: datetime, attributes: dict[str, Any], error: str = "") -> None:
    """Make and end a span with these ids (a `trace_id` for a root span; else the parent's, from `context`)."""
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind, Status, StatusCode

    if trace_id is not None:
        context = Context()  # a root: not the child of whatever span is current (a request's)
    token = _forced_ids.set((trace_id, span_id))
    try:
        span = tracer.start_span(name, context=context, kind=SpanKind.INTERNAL, attributes=attributes,
                                 start_time=_ns(start))
    finally:
        _forced_ids.reset(token)
    if error:
        span.set_status(Status(StatusCode.ERROR, error[:500]))
    span.end(end_time=_ns(max(start, end)))


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000) * 1000
