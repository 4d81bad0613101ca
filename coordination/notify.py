"""PostgreSQL notifications: wake waiting requests (long-polling pulls, lock requests with `wait_s`) when they
may succeed, and tell the agent cache which agents changed.

Services send `NOTIFY` in the transaction that makes waiting worthwhile (a step
became ready, a lock was released); PostgreSQL delivers it only when that
transaction commits, so a woken request always finds the committed change.
One listener thread per process holds a dedicated connection that `LISTEN`s on
every channel and sets the `threading.Event` of each waiter for that channel
and key. Waiting requests hold no database connection and no transaction.

A step-ready notification says how many steps of the role became ready
(`"developer:3"`), and wakes that many of the role's waiters, longest waiting
first, not all of them: with 32 agents long-polling one role, one released step
costs one pull, not 32 (which, on a busy server, is what dispatch latency was
made of). A woken pull that does not take a step of that role passes the wake
on to the next waiter (`pass_on`), so a step is never left with nobody woken
for it. Lock notifications wake every waiter of the project.

If the listener cannot connect (PostgreSQL restarting), waiters fall back to a
re-check every `FALLBACK_RECHECK_S`, so none is stuck past its deadline, and
authentication reads every agent from the database instead of the cache.

Other parts of the process `subscribe` to a channel to be told its
notifications: the agent cache (`coordination/agent_cache.py`) drops an agent
when a trigger on `coordination_agent` says it changed (`am_agents`). A
subscriber is also told `None` ("anything may have changed") on every
(re)connect, before `connected` is set, because notifications sent while the
listener was away are lost.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

from django.db import connection

logger = logging.getLogger(__name__)

STEP_READY = "am_step_ready"  # payload: "<role>:<how many steps became ready>" (or a bare role: wake all)
LOCKS = "am_locks"  # payload: a project id
# Sent by the triggers of migration 0007 when an agent row changes (not for a `last_seen_at` touch); payload: the
# agent's id, or "*" after a TRUNCATE.
AGENTS = "am_agents"
CHANNELS = (STEP_READY, LOCKS, AGENTS)
FALLBACK_RECHECK_S = 2.0


def _notify(channel: str, keys: Iterable[str]) -> None:
    distinct = sorted({str(key) for key in keys})
    if not distinct:
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, k) FROM unnest(%s::text[]) AS k", [channel, distinct])


def notify_ready(roles: Iterable[str]) -> None:
    """Tell long-polling pulls of these roles, when the current transaction commits: one role per step
    that became ready (repeated for several), so as many waiters are woken as there are steps."""
    counts = Counter(roles)
    _notify(STEP_READY, (f"{role}:{count}" for role, count in counts.items()))


def notify_ready_counts(counts: dict[str, int]) -> None:
    """`notify_ready` with the number of ready steps per role already counted."""
    _notify(STEP_READY, (f"{role}:{count}" for role, count in counts.items() if count > 0))


def notify_locks(project_ids: Iterable[object]) -> None:
    """Tell lock requests waiting in these projects, when the current transaction commits."""
    _notify(LOCKS, project_ids)


class Waiter:
    __slots__ = ("pairs", "event", "woken_by")

    def __init__(self, channel: str, keys: frozenset[str]) -> None:
        self.pairs = {(channel, key) for key in keys}
        self.event = threading.Event()
        # The step-ready roles whose wakes this waiter was handed (consumed by taking such a step, or passed on).
        self.woken_by: list[str] = []

    def also(self, channel: str, keys: Iterable[object]) -> None:
        """Wake on these (channel, key) notifications too."""
        with listener._lock:
            self.pairs |= {(channel, str(key)) for key in keys}

    def wait(self, timeout: float) -> bool:
        """Sleep until notified or `timeout` s; shorter while the listener is disconnected."""
        if not listener.connected.is_set():
            timeout = min(timeout, FALLBACK_RECHECK_S)
        woken = self.event.wait(max(0.0, timeout))
        self.event.clear()
        return woken

    def take_wakes(self) -> list[str]:
        """The step-ready roles this waiter was woken for since the last call."""
        with listener._lock:
            roles, self.woken_by = self.woken_by, []
        return roles


class Listener:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Insertion-ordered: the longest waiting are woken first.
        self._waiters: dict[Waiter, None] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.connected = threading.Event()
        self._subscribers: dict[str, list[Callable[[str | None], None]]] = {}

    def ensure_started(self) -> None:
        """Start the listening thread if this process has none running (cheap when it has)."""
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                # A thread that is not running is not listening, whatever `connected` says (after a fork, a
                # child inherits the parent's set event but not its thread).
                self.connected.clear()
                self._thread = threading.Thread(target=self._run, name="am-listener", daemon=True)
                self._thread.start()

    def subscribe(self, channel: str, callback: Callable[[str | None], None]) -> None:
        """Call `callback(payload)` for each notification on `channel` (one of `CHANNELS`), in the listener's
        thread, and `callback(None)` on every (re)connect, before `connected` is set."""
        with self._lock:
            self._subscribers.setdefault(channel, []).append(callback)

    def _tell(self, channel: str | None, payload: str | None) -> bool:
        """Hand a notification to the subscribers of its channel (`channel` None: every subscriber, with None);
        False when nobody subscribes to the channel."""
        with self._lock:
            if channel is None:
                callbacks = [callback for callbacks in self._subscribers.values() for callback in callbacks]
            else:
                callbacks = list(self._subscribers.get(channel, ()))
        for callback in callbacks:
            callback(payload)
        return bool(callbacks)

    @staticmethod
    def _conninfo() -> dict:
        params = connection.get_connection_params()
        for key in ("cursor_factory", "context", "prepare_threshold", "server_side_binding"):
            params.pop(key, None)
        return params

    def stop(self) -> None:
        """Close the listening connection and end the thread (tests, before dropping their database)."""
        self._stopping.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)
        self._thread = None
        self._stopping.clear()
        self.connected.clear()

    def _run(self) -> None:
        import psycopg

        delay = 0.5
        while not self._stopping.is_set():
            try:
                with psycopg.connect(**self._conninfo(), autocommit=True) as conn:
                    for channel in CHANNELS:
                        conn.execute(f"LISTEN {channel}")
                    # Subscribers forget what they keep before anyone trusts it again: notifications sent while
                    # we were away are lost, and from here on none is.
                    self._tell(None, None)
                    self.connected.set()
                    delay = 0.5
                    # Wake everyone once: something may have changed while we were away.
                    self._wake(None, None)
                    idle = 0
                    while not self._stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            if not self._tell(note.channel, note.payload):
                                self._wake(note.channel, note.payload)
                        idle += 1
                        if idle % 30 == 0:
                            conn.execute("SELECT 1")  # notice a dead connection even when idle
                return
            except Exception:  # noqa: BLE001 - keep listening whatever happens
                self.connected.clear()
                logger.warning("The notification listener lost its connection; retrying in %.1f s.", delay,
                               exc_info=True)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _wake(self, channel: str | None, key: str | None) -> None:
        if channel == STEP_READY and key and ":" in key:
            role, _, count = key.rpartition(":")
            self.wake_some(role, int(count) if count.isdigit() else len(self._waiters))
            return
        with self._lock:
            for waiter in self._waiters:
                if channel is None or (channel, key) in waiter.pairs:
                    waiter.event.set()

    def wake_some(self, role: str, count: int, *, besides: Waiter | None = None) -> None:
        """Wake up to `count` waiters of `role` not woken already, longest waiting first."""
        pair = (STEP_READY, role)
        with self._lock:
            for waiter in self._waiters:
                if count <= 0:
                    break
                if waiter is not besides and pair in waiter.pairs and not waiter.event.is_set():
                    waiter.woken_by.append(role)
                    waiter.event.set()
                    count -= 1

    def pass_on(self, waiter: Waiter, roles: Iterable[str]) -> None:
        """Hand wakes a waiter did not use (it took no step of that role) to other waiters of the role."""
        for role in roles:
            self.wake_some(role, 1, besides=waiter)

    def register(self, channel: str, keys: Iterable[object]) -> Waiter:
        """Register before checking, so a notification between the check and the wait is not lost."""
        self.ensure_started()
        waiter = Waiter(channel, frozenset(str(key) for key in keys))
        with self._lock:
            self._waiters[waiter] = None
        return waiter

    def unregister(self, waiter: Waiter) -> None:
        with self._lock:
            self._waiters.pop(waiter, None)
        unused = waiter.take_wakes()
        if unused:
            self.pass_on(waiter, unused)


listener = Listener()
