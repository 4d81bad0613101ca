"""The event log: every change appends its events in its own transaction; they are published after commit.

A workflow's events are numbered from its row (`event_seq`), the last lock a
change takes (see `lock_order`), so they are ordered as the changes committed.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from django.db import connection, transaction

from coordination import rows
from coordination.errors import NotFound
from coordination.events import event_published, publish_event
from coordination.models import Event

# Plain SQL: allocate a number and read it back in one round trip.
NEXT_SEQ_SQL = "UPDATE coordination_workflow SET event_seq = event_seq + 1 WHERE id = %(workflow)s RETURNING event_seq"


def next_seq(workflow_id: UUID) -> int:
    with connection.cursor() as cursor:
        cursor.execute(NEXT_SEQ_SQL, {"workflow": workflow_id})
        row = rows.fetch_named(cursor)
    if row is None:
        raise NotFound(f"Workflow {workflow_id} does not exist.")
    return row["event_seq"]


def event_record(
    *,
    kind: str,
    workflow_id: UUID | None = None,
    step_id: UUID | None = None,
    agent_id: UUID | None = None,
    data: dict[str, Any] | None = None,
    seq: int | None = None,
) -> Event:
    """Append an event; pass `seq` only when the caller has already allocated it."""
    if workflow_id is not None and seq is None:
        seq = next_seq(workflow_id)
    event = Event.objects.create(
        workflow_id=workflow_id, seq=seq, kind=kind, step_id=step_id, agent_id=agent_id, data=data or {}
    )
    return event_published(event)


def event_record_many(events: list[Event]) -> list[Event]:
    """Insert events whose `seq` the caller allocated; publish them, in order, after commit."""
    if not events:
        return events
    created = Event.objects.bulk_create(events)
    transaction.on_commit(lambda: [publish_event(event) for event in created])
    return created
