"""The event log: every change appends its events in its own transaction; they are published after commit.

An event's `seq` is given by the database (`models.NextEventSeq`, the column's
default): its transaction's id, then its rank in that transaction, so the log is
ordered by when each change began to write, and within a change as it wrote.
Reading only below the oldest transaction still running (`selectors.visible_events`)
makes the log append-only for readers: one that goes on from the last `seq` it saw
never misses an event. No change waits on a counter to number its events. (Two
changes that overlap may appear in the other order than they committed: a cancel
that began before a report it then waited for is logged before the report.)
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.db import transaction

from coordination.events import event_published, publish_event
from coordination.models import Event


def event_record(
    *,
    kind: str,
    workflow_id: UUID | None = None,
    step_id: UUID | None = None,
    agent_id: UUID | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    """Append an event (its `seq` comes back from the insert)."""
    event = Event.objects.create(workflow_id=workflow_id, kind=kind, step_id=step_id, agent_id=agent_id,
                                 data=data or {})
    return event_published(event)


def event_record_many(events: list[Event]) -> list[Event]:
    """Insert events, numbered in list order; publish them, in order, after commit."""
    if not events:
        return events
    created = Event.objects.bulk_create(events)
    transaction.on_commit(lambda: [publish_event(event) for event in created])
    return created
