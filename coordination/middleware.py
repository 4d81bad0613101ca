"""Middleware of every request.

`server_timing`: `Server-Timing` on every response, the time the server spent
on it, as clients and browsers can read it. Agents' logs, the browser's network
panel and the benchmarks then tell the server's share of a slow request from the
network's and the client's.

`tracing`: an OpenTelemetry span per request, when traces are on (am_project/telemetry.py).
"""

from __future__ import annotations

import time

from asgiref.sync import iscoroutinefunction
from django.core.exceptions import MiddlewareNotUsed
from django.utils.decorators import sync_and_async_middleware

from am_project import telemetry


def _stamp(response, started: float):
    response["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    return response


@sync_and_async_middleware
def server_timing(get_response):
    if iscoroutinefunction(get_response):
        async def middleware(request):
            started = time.perf_counter()
            return _stamp(await get_response(request), started)
    else:
        def middleware(request):
            started = time.perf_counter()
            return _stamp(get_response(request), started)
    return middleware


@sync_and_async_middleware
def tracing(get_response):
    """A span per request (HTTP semantic conventions) when OpenTelemetry traces are on; out of the chain when off.

    A request that carries a W3C `traceparent` (a worker's, sent under its step's
    span) is made that span's child, so a step's requests read as part of its tree.
    """
    if telemetry.tracer is None:
        raise MiddlewareNotUsed("OpenTelemetry traces are off")
    from opentelemetry import trace

    if iscoroutinefunction(get_response):
        async def middleware(request):
            span = _request_span(request)
            with trace.use_span(span, end_on_exit=True, record_exception=True):
                return _response_attributes(span, request, await get_response(request))
    else:
        def middleware(request):
            span = _request_span(request)
            with trace.use_span(span, end_on_exit=True, record_exception=True):
                return _response_attributes(span, request, get_response(request))
    return middleware


def _request_span(request):
    from opentelemetry import propagate, trace

    meta = request.META
    attributes = {
        "http.request.method": request.method, "url.path": request.path, "url.scheme": request.scheme,
        "server.address": meta.get("SERVER_NAME", ""), "network.protocol.version":
            meta.get("SERVER_PROTOCOL", "").removeprefix("HTTP/"),
    }
    if meta.get("SERVER_PORT", "").isdigit():
        attributes["server.port"] = int(meta["SERVER_PORT"])
    if meta.get("REMOTE_ADDR"):
        attributes["client.address"] = meta["REMOTE_ADDR"]
    if meta.get("HTTP_USER_AGENT"):
        attributes["user_agent.original"] = meta["HTTP_USER_AGENT"]
    parent = propagate.extract(request.headers)
    return telemetry.tracer.start_span(request.method, context=parent, kind=trace.SpanKind.SERVER,
                                       attributes=attributes)


def _response_attributes(span, request, response):
    from opentelemetry import trace

    from coordination.api.auth import AgentUser

    match = getattr(request, "resolver_match", None)
    if match is not None and match.route:
        span.set_attribute("http.route", match.route)
        span.update_name(f"{request.method} {match.route}")
    span.set_attribute("http.response.status_code", response.status_code)
    # Only an agent already authenticated (by DRF): evaluating a session's lazy user could query the database.
    user = request.__dict__.get("user")
    if type(user) is AgentUser:
        span.set_attribute("am.agent.name", user.agent.name)
    if response.status_code >= 500:
        span.set_attribute("error.type", str(response.status_code))
        span.set_status(trace.Status(trace.StatusCode.ERROR))
    return response
