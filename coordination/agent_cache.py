"""Agents by token hash, kept per process, so an authenticated request does not read its agent's row.

Every pull, heartbeat, report and lock call authenticates; reading the agent
was one statement of each. The cache answers instead, and stays correct by
being told of every change:

1. A trigger on `coordination_agent` (migration 0007) sends `NOTIFY am_agents,
   '<agent id>'` when a row changes (not for a `last_seen_at` touch) or is
   deleted; PostgreSQL delivers it at commit to the listener thread of every
   process (`coordination/notify.py`), which drops that agent here. So a change
   made anywhere (a service, the admin, SQL by hand) reaches every process
   within the notification's delay.
2. The services that change an agent also drop it in their own process at once
   and again after commit (`forget`), so the process that disabled an agent or
   rotated its token refuses the old one without waiting for the notification.
3. The cache is trusted only while the listener is connected: until then, or
   after it loses its connection, every request reads the database. On every
   (re)connect everything is dropped, since notifications sent meanwhile are lost.
4. A request that read the row before a change committed must not store that
   stale row after the change's notification was handled: `generation` is
   taken before the read, every drop moves it on, and `put` stores nothing if
   it moved.

Entries also expire after `MAX_AGE_S` (a safety net: a listener connection that
died silently is noticed within about 30 s) and the least recently used go
past `MAX_ENTRIES`. Unknown tokens are not kept: a flood of wrong tokens cannot
push agents out, and a new agent needs no invalidation. Each caller gets its
own copy of the agent, so no request changes another's.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from uuid import UUID

from django.db import transaction

from coordination import notify
from coordination.models import Agent

MAX_ENTRIES = 4096
MAX_AGE_S = 60.0


def _copy(agent: Agent) -> Agent:
    """An agent no other request holds (its own model state and roles list)."""
    clone = copy.copy(agent)
    clone.roles = list(agent.roles)
    return clone


class AgentCache:
    def __init__(self, *, connected: threading.Event, max_entries: int = MAX_ENTRIES, max_age_s: float = MAX_AGE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._connected = connected
        self._max_entries = max_entries
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        # token hash -> (agent, monotonic time it was read from the database); oldest used first.
        self._entries: OrderedDict[str, tuple[Agent, float]] = OrderedDict()
        self._generation = 0

    @property
    def generation(self) -> int:
        """Take it before reading an agent from the database, and hand it to `put`."""
        with self._lock:
            return self._generation

    def get(self, token_hash: str) -> Agent | None:
        """A copy of the cached agent; None when it is not cached, too old, or the cache cannot be trusted."""
        if not self._connected.is_set():
            return None
        with self._lock:
            entry = self._entries.get(token_hash)
            if entry is None:
                return None
            agent, stored_at = entry
            if self._clock() - stored_at > self._max_age_s:
                del self._entries[token_hash]
                return None
            self._entries.move_to_end(token_hash)
            return _copy(agent)

    def put(self, token_hash: str, agent: Agent, *, generation: int) -> bool:
        """Keep a copy of `agent`, read from the database after `generation` was taken; False (nothing kept)
        when something was dropped since, or the listener is not connected."""
        with self._lock:
            if generation != self._generation or not self._connected.is_set():
                return False
            self._entries[token_hash] = (_copy(agent), self._clock())
            self._entries.move_to_end(token_hash)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
            return True

    def seen(self, *, token_hash: str, at: datetime) -> None:
        """The agent's `last_seen_at` was just written: keep it, so the next touch is again `AGENT_SEEN_TOUCH_S`
        later (the touch sends no notification, and the cached row would otherwise ask for one every time)."""
        with self._lock:
            entry = self._entries.get(token_hash)
            if entry is not None:
                entry[0].last_seen_at = at

    def forget(self, agent_id: UUID | str | None) -> None:
        """Drop the agent with this id (every agent for None), and turn away rows read before now."""
        key = None if agent_id is None else str(agent_id)
        with self._lock:
            self._generation += 1
            if key is None:
                self._entries.clear()
                return
            for token_hash in [h for h, (agent, _at) in self._entries.items() if str(agent.id) == key]:
                del self._entries[token_hash]

    def __len__(self) -> int:
        return len(self._entries)


def _on_notification(payload: str | None) -> None:
    cache.forget(None if payload in (None, "*") else payload)


cache = AgentCache(connected=notify.listener.connected)
notify.listener.subscribe(notify.AGENTS, _on_notification)


def read_through(token_hash: str, load: Callable[[str], Agent | None]) -> Agent | None:
    """The agent with this token hash: from the cache when it can be trusted, else `load(token_hash)` (kept for
    the next request unless an agent changed meanwhile). Starts the listener, without which nothing is kept."""
    notify.listener.ensure_started()
    agent = cache.get(token_hash)
    if agent is not None:
        return agent
    generation = cache.generation
    agent = load(token_hash)
    if agent is not None:
        cache.put(token_hash, agent, generation=generation)
    return agent


def agent_changed(agent_id: UUID) -> None:
    """For the services that change an agent: drop it now, so this process refuses an old token or a disabled
    agent at once (other processes drop it on the trigger's notification), and again after commit, since another
    request may have cached the row still committed in between."""
    cache.forget(agent_id)
    transaction.on_commit(lambda: cache.forget(agent_id))
