"""OpenTelemetry traces of a worker: a span per step, a span per LLM call. Off unless asked for.

`setup()` (called by `am-worker` at start) turns tracing on when the standard
variables ask for it: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, or `OTEL_TRACES_EXPORTER` is
`otlp` or `console`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
keeps it off. The SDK (`pip install './agents[otel]'`) then exports through
OTLP http/protobuf in batches, and reads the other standard variables itself
(headers, timeout, sampler, `OTEL_SERVICE_NAME`, resource attributes).

Off, nothing of OpenTelemetry is imported and every function here returns at
its first line (`tracer is None`).

A step's span is the child of the server's span for its attempt, whose W3C
`traceparent` comes with the lease; requests sent while a span is current carry
it, so the server's spans for them join the same tree; an LLM call's span is the
child of its step's span. Attribute names follow the GenAI semantic conventions
(`gen_ai.*`); AgentManager's own are under `am.*`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger("agents.telemetry")

# The tracer spans are made with; None while tracing is off.
tracer: Any = None

_OFF = contextlib.nullcontext()
EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("", "http/protobuf")
# `gen_ai.usage.*` has no cost: the dollars a call cost, from the configured prices per million tokens.
COST_ATTRIBUTE = "am.llm.cost_usd"


class TelemetryConfigError(ValueError):
    """An OTEL_* variable asks for something this install cannot do."""


def traces_wanted(environ: Mapping[str, str]) -> str | None:
    """The span exporter the standard variables ask for (`otlp` or `console`), or None: tracing off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if "," in exporter:
        raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: give one exporter, one of {EXPORTERS}.")
    if exporter and exporter not in EXPORTERS:
        raise TelemetryConfigError(f"OTEL_TRACES_EXPORTER={exporter!r} is not one of {EXPORTERS}.")
    if exporter == "none":
        return None
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not exporter and not endpoint:
        return None
    exporter = exporter or "otlp"
    if exporter == "otlp":
        for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = environ.get(variable, "").strip().lower()
            if protocol not in PROTOCOLS:
                raise TelemetryConfigError(f"{variable}={protocol!r}: only http/protobuf is supported.")
            if protocol:
                break
    return exporter


def make_provider(exporter_name: str, *, service_name: str, id_generator: Any = None) -> Any:
    """The SDK's TracerProvider exporting in batches through `exporter_name` (see `traces_wanted`)."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create()
    if resource.attributes.get(SERVICE_NAME, "").startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource, id_generator=id_generator)
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup(environ: Mapping[str, str], *, service_name: str = "am-worker") -> bool:
    """Turn tracing on if the OTEL_* variables ask for it and the SDK is installed; whether it is on.

    Raises TelemetryConfigError for a variable asking for what cannot be done.
    """
    exporter = traces_wanted(environ)
    if exporter is None:
        return False
    try:
        provider = make_provider(exporter, service_name=service_name)
    except ImportError as exc:
        logger.warning("OTEL_* variables ask for traces, but the OpenTelemetry SDK is missing (%s): "
                       "install the worker with its otel extra, pip install './agents[otel]'. No traces.", exc)
        return False
    from opentelemetry import trace

    trace.set_tracer_provider(provider)  # so that other instrumented libraries export through it too
    use_provider(provider)
    return True


def use_provider(provider: Any) -> None:
    """Make spans with `provider` (a TracerProvider), or stop making them (None)."""
    global tracer
    tracer = None if provider is None else provider.get_tracer("agents")


def inject(headers: dict[str, str] | None) -> dict[str, str] | None:
    """`headers` plus the current span's `traceparent`, for a request to the server."""
    if tracer is None:
        return headers
    from opentelemetry import propagate

    carrier = dict(headers or {})
    propagate.inject(carrier)
    return carrier


def step_span(pulled: Any) -> contextlib.AbstractContextManager:
    """A span around the work of one pulled step, the child of the server's attempt span."""
    if tracer is None:
        return _OFF
    return _step_span(pulled)


@contextlib.contextmanager
def _step_span(pulled: Any) -> Iterator[Any]:
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    step, workflow = pulled.step, pulled.workflow
    traceparent = pulled.lease.get("traceparent")
    parent = TraceContextTextMapPropagator().extract({"traceparent": traceparent}) if traceparent else None
    attributes = {
        "am.workflow.id": str(workflow["id"]), "am.workflow.name": workflow.get("name", ""),
        "am.project": workflow.get("project") or "", "am.step.id": str(step["id"]), "am.step.key": step["key"],
        "am.step.role": step["role"], "am.attempt": int(step.get("attempt", 1)),
    }
    with tracer.start_as_current_span(f"step {step['role']}", context=parent, kind=SpanKind.INTERNAL,
                                      attributes=attributes) as span:
        yield span


def step_outcome(outcome: str, error: str = "") -> None:
    """Record how the current step ended: completed, failed, handed_back, lease_lost."""
    if tracer is None:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    span = trace.get_current_span()
    span.set_attribute("am.outcome", outcome)
    if outcome == "failed":
        span.set_status(Status(StatusCode.ERROR, error or "failed"))


def llm_call(*, provider: str, model: str, purpose: str, base_url: str | None = None,
             temperature: float | None = None) -> contextlib.AbstractContextManager:
    """A span around one chat completion request (GenAI semantic conventions); yields it, or None when off.

    An exception raised inside marks the span failed, with its type as `error.type`.
    """
    if tracer is None:
        return _OFF
    return _llm_call(provider=provider, model=model, purpose=purpose, base_url=base_url, temperature=temperature)


@contextlib.contextmanager
def _llm_call(*, provider: str, model: str, purpose: str, base_url: str | None,
              temperature: float | None) -> Iterator[Any]:
    from opentelemetry.trace import SpanKind, Status, StatusCode

    attributes: dict[str, Any] = {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": provider, "gen_ai.system": provider,
        "gen_ai.request.model": model, "am.llm.purpose": purpose,
    }
    if temperature is not None:
        attributes["gen_ai.request.temperature"] = temperature
    if base_url:
        parts = urlsplit(base_url)
        if parts.hostname:
            attributes["server.address"] = parts.hostname
            attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
    with tracer.start_as_current_span(f"chat {model}", kind=SpanKind.CLIENT, attributes=attributes,
                                      record_exception=True, set_status_on_exception=False) as span:
        try:
            yield span
        except BaseException as exc:
            span.set_attribute("error.type", type(exc).__name__)
            span.set_status(Status(StatusCode.ERROR, str(exc)[:500]))
            raise


def llm_result(span: Any, *, response: Any, input_tokens: int, output_tokens: int, cost_usd: float) -> None:
    """What a chat completion answered, on its span (from `llm_call`; None when off)."""
    if span is None:
        return
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
    span.set_attribute(COST_ATTRIBUTE, cost_usd)
    model = getattr(response, "model", None)
    if model:
        span.set_attribute("gen_ai.response.model", model)
    response_id = getattr(response, "id", None)
    if response_id:
        span.set_attribute("gen_ai.response.id", response_id)
    reasons = [choice.finish_reason for choice in getattr(response, "choices", None) or [] if choice.finish_reason]
    if reasons:
        span.set_attribute("gen_ai.response.finish_reasons", reasons)
