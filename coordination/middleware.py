"""`Server-Timing` on every response: the time the server spent on it, as clients and browsers can read it.

Agents' logs, the browser's network panel and the benchmarks then tell the
server's share of a slow request from the network's and the client's.
"""

from __future__ import annotations

import time

from asgiref.sync import iscoroutinefunction
from django.utils.decorators import sync_and_async_middleware


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
