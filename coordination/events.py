"""Events: published to the dashboards after the change they record commits.

Services record events (`coordination/services/event_log.py`) in the
transaction of the change and hand them here with `event_published`, which
schedules the broadcast with `transaction.on_commit`, so a rolled-back change
is never shown and a committed one always is. Publishing is best effort: when Redis is down the
change still stands, and dashboards catch up from the log (`after=seq`).
"""

import logging
from typing import Any
from uuid import UUID

from django.db import transaction

from coordination.models import Event

logger = logging.getLogger(__name__)

OVERVIEW_GROUP = "overview"


def workflow_group(workflow_id: UUID | str) -> str:
    return f"workflow.{workflow_id}"


def project_group(name: str) -> str:
    """The group of a project's pages (its tree and open files). Project names are slugs: valid group names."""
    return f"project.{name}"


def event_published(event: Event) -> Event:
    """Publish an event the caller has inserted, once the transaction commits."""
    transaction.on_commit(lambda: publish_event(event))
    return event


def inserted_event_published(event: Event) -> Event:
    """`event_published` for an event a statement of the caller's has inserted (the instance is built from what
    the statement returned, so Django must not treat it as unsaved)."""
    event._state.adding = False
    return event_published(event)


def event_payload(event: Event) -> dict[str, Any]:
    return {
        "id": event.id,
        "workflow_id": str(event.workflow_id) if event.workflow_id else None,
        "seq": event.seq,
        "kind": event.kind,
        "step_id": str(event.step_id) if event.step_id else None,
        "agent_id": str(event.agent_id) if event.agent_id else None,
        "at": event.at.isoformat().replace("+00:00", "Z"),
        "data": event.data,
    }


class _Publisher:
    """One daemon thread per process with its own event loop and channel layer, sending events in order.

    Requests hand events over (`call_soon_threadsafe`) and return at once: they
    never wait on Redis, and a Redis outage costs them nothing (the queue is
    bounded; dropped broadcasts are caught up by dashboards from the log). The
    loop waits on an asyncio queue, so no non-daemon thread keeps the process alive.
    """

    def __init__(self, maxsize: int = 10000) -> None:
        import threading

        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._loop = None
        self._queue = None
        self._failing = False

    def submit(self, messages: list[tuple[str, dict]]) -> None:
        if not self._ensure_started():
            logger.warning("The broadcast thread is not running; dropping %d message(s).", len(messages))
            return
        try:
            self._loop.call_soon_threadsafe(self._put, messages)
        except RuntimeError:
            pass  # the loop is closed: the process is exiting

    def _put(self, messages) -> None:
        if self._queue.qsize() >= self._maxsize:
            logger.warning("The broadcast queue is full (Redis down?); dropping %d message(s).", len(messages))
            return
        self._queue.put_nowait(messages)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything submitted so far was sent (tests, shutdown)."""
        import threading

        done = threading.Event()
        self.submit([("__flush__", {"event": done})])
        done.wait(timeout)

    def _ensure_started(self) -> bool:
        import threading

        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._ready.clear()
                self._thread = threading.Thread(target=self._run, name="am-publisher", daemon=True)
                self._thread.start()
        return self._ready.wait(5)

    def _run(self) -> None:
        import asyncio

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        self._queue = asyncio.Queue()
        self._ready.set()
        try:
            loop.run_until_complete(self._consume())
        except RuntimeError:
            pass  # the interpreter is shutting down under this daemon thread

    async def _consume(self) -> None:
        import asyncio

        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        while True:
            messages = await self._queue.get()
            for group, message in messages:
                if group == "__flush__":
                    message["event"].set()
                    continue
                try:
                    # A timeout scope, not `wait_for`: no task is made for each send.
                    async with asyncio.timeout(2.0):
                        await layer.group_send(group, message)
                except Exception as exc:  # noqa: BLE001 - a broken broadcast must not stop the publisher
                    if not self._failing:
                        # Once per outage, not once per event: the log would drown.
                        logger.warning("Could not publish to %s (%s: %s); dashboards will catch up from the "
                                       "event log. Is Redis up?", group, type(exc).__name__, exc)
                    self._failing = True
                else:
                    if self._failing:
                        logger.warning("Publishing live updates again.")
                    self._failing = False


publisher = _Publisher()


def publish_event(event: Event) -> None:
    """Queue the event for the dashboard groups (workflow, project, overview); never blocks, never raises."""
    message = {"type": "am.event", "event": event_payload(event)}
    groups = ([workflow_group(event.workflow_id)] if event.workflow_id else []) + [OVERVIEW_GROUP]
    project = event.data.get("project") if isinstance(event.data, dict) else None
    if isinstance(project, str) and project:
        groups.append(project_group(project))
    publisher.submit([(group, message) for group in groups])

