"""Wake long-polling pulls when a step of their role becomes ready.

Services call `notify_ready(roles)` in the transaction that makes steps ready;
PostgreSQL delivers `NOTIFY` only when that transaction commits, so a woken
puller always finds the committed step. One listener thread per process holds a
dedicated connection that `LISTEN`s and sets the `threading.Event` of every
waiter of that role. Waiting pulls hold no database connection, no transaction
and no request thread's database state while they wait.

If the listener cannot connect (PostgreSQL restarting), waiters fall back to a
re-check every `FALLBACK_RECHECK_S`, so a pull is never stuck past its deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from django.db import connection

logger = logging.getLogger(__name__)

CHANNEL = "am_step_ready"
FALLBACK_RECHECK_S = 2.0


def notify_ready(roles: Iterable[str]) -> None:
    """Tell long-polling pulls of these roles, when the current transaction commits."""
    distinct = sorted(set(roles))
    if not distinct:
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, r) FROM unnest(%s::text[]) AS r", [CHANNEL, distinct])


class _Waiter:
    __slots__ = ("roles", "event")

    def __init__(self, roles: frozenset[str]) -> None:
        self.roles = roles
        self.event = threading.Event()


class ReadyListener:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[_Waiter] = set()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()

    def _ensure_started(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="am-ready-listener", daemon=True)
                self._thread.start()

    def _conninfo(self) -> dict:
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        params.pop("prepare_threshold", None)
        params.pop("server_side_binding", None)
        return params

    def _run(self) -> None:
        import psycopg

        delay = 0.5
        while True:
            try:
                with psycopg.connect(**self._conninfo(), autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    delay = 0.5
                    # Wake everyone once: a step may have become ready while we were away.
                    self._wake(None)
                    while True:
                        for note in conn.notifies(timeout=30.0):
                            self._wake(note.payload)
                        conn.execute("SELECT 1")  # notice a dead connection even when idle
            except Exception:  # noqa: BLE001 - keep listening whatever happens
                self.connected.clear()
                logger.warning("Ready-step listener lost its connection; retrying in %.1f s.", delay, exc_info=True)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _wake(self, role: str | None) -> None:
        with self._lock:
            for waiter in self._waiters:
                if role is None or role in waiter.roles:
                    waiter.event.set()

    def register(self, roles: Iterable[str]) -> _Waiter:
        """Register before checking the queue, so a notification between check and wait is not lost."""
        self._ensure_started()
        waiter = _Waiter(frozenset(roles))
        with self._lock:
            self._waiters.add(waiter)
        return waiter

    def unregister(self, waiter: _Waiter) -> None:
        with self._lock:
            self._waiters.discard(waiter)


listener = ReadyListener()
