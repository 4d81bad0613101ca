"""What a database error means for the caller: the server was busy (retry), or PostgreSQL is really unreachable.

Shared by the REST API's error handler and the MCP endpoint, so both tell a
client the same thing. "Unreachable" is said only when a fresh connection
attempt fails too: a pool with no free connection or a statement cancelled for
taking too long is a busy server, not an outage.
"""

from __future__ import annotations

import logging
import threading
import time

from django.db import connection

from coordination.errors import Busy, ServiceError
from coordination.services.lock_order import RETRYABLE_SQLSTATES

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2
PROBE_CACHE_S = 2.0

# SQLSTATE classes and codes of a server that is up but cannot take this request now.
BUSY_SQLSTATES = {
    "53000": "PostgreSQL ran short of resources",
    "53100": "PostgreSQL's disk is full",
    "53200": "PostgreSQL ran out of memory",
    "53300": "PostgreSQL has no room for more connections",
    "57014": "a statement was cancelled for taking too long",
    **RETRYABLE_SQLSTATES,
}
# SQLSTATEs of a server that is going away or not there.
DOWN_SQLSTATES = {"57P01", "57P02", "57P03"}


class DatabaseUnavailable(ServiceError):
    code = "database_unavailable"
    status = 503


_probe_lock = threading.Lock()
_probe: tuple[float, bool] = (0.0, True)


def postgres_reachable() -> bool:
    """Whether a new connection to PostgreSQL can be opened now (cached for a moment: many requests fail at once)."""
    global _probe
    with _probe_lock:
        checked_at, reachable = _probe
        if time.monotonic() - checked_at < PROBE_CACHE_S:
            return reachable
        import psycopg

        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        params.pop("prepare_threshold", None)
        params.pop("server_side_binding", None)
        params["connect_timeout"] = PROBE_TIMEOUT_S
        try:
            psycopg.connect(**params).close()
            reachable = True
        except Exception:  # noqa: BLE001 - any failure to connect is what we are asking about
            reachable = False
        _probe = (time.monotonic(), reachable)
        return reachable


def explain(exc: BaseException) -> ServiceError:
    """The error to answer with for a database exception (an OperationalError or InterfaceError)."""
    cause = exc.__cause__ or exc
    sqlstate = getattr(cause, "sqlstate", None) or ""
    if sqlstate in BUSY_SQLSTATES:
        return Busy(f"The server is busy ({BUSY_SQLSTATES[sqlstate]}); nothing was changed. Retry in a few seconds.",
                    retryable=True)
    if sqlstate and sqlstate not in DOWN_SQLSTATES and not sqlstate.startswith("08"):
        return Busy(f"The database refused the request ({sqlstate}: {str(cause).strip()[:200]}); nothing was changed. "
                    "Retry in a few seconds.", retryable=True)
    if postgres_reachable():
        return Busy("The server is busy (no database connection was free in time); nothing was changed. "
                    "Retry in a few seconds.", retryable=True)
    return DatabaseUnavailable("PostgreSQL is unreachable; nothing was changed. Retry in a few seconds.",
                               retryable=True)
