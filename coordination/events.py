"""Events: written in the transaction of the change they record, published after commit.

`event_record` appends to the workflow's ordered log (`seq` allocated from the
workflow row, which the change has usually locked already) and schedules the
broadcast with `transaction.on_commit`, so a rolled-back change is never shown
and a committed one always is. Publishing is best effort: when Redis is down the
change still stands, and dashboards catch up from the log (`after=seq`).
"""

import logging
from typing import Any
from uuid import UUID

from asgiref.sync import async_to_sync
from django.db import connection, transaction

from coordination.models import Event

logger = logging.getLogger(__name__)

OVERVIEW_GROUP = "overview"


def workflow_group(workflow_id: UUID | str) -> str:
    return f"workflow.{workflow_id}"


def _next_seq(workflow_id: UUID) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE coordination_workflow SET event_seq = event_seq + 1 WHERE id = %s RETURNING event_seq",
            [workflow_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise LookupError(f"workflow {workflow_id} does not exist")
    return row[0]


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
        seq = _next_seq(workflow_id)
    event = Event.objects.create(
        workflow_id=workflow_id, seq=seq, kind=kind, step_id=step_id, agent_id=agent_id, data=data or {}
    )
    transaction.on_commit(lambda: publish_event(event))
    return event


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


def publish_event(event: Event) -> None:
    """Send the event to the dashboard groups; never raise into the caller."""
    from channels.layers import get_channel_layer

    message = {"type": "am.event", "event": event_payload(event)}
    try:
        layer = get_channel_layer()
        if layer is None:
            return
        send = async_to_sync(layer.group_send)
        if event.workflow_id:
            send(workflow_group(event.workflow_id), message)
        send(OVERVIEW_GROUP, message)
    except Exception:  # noqa: BLE001 - a broken broadcast must not undo a committed change
        logger.warning("Could not publish event %s (%s); dashboards will catch up from the log.",
                       event.id, event.kind, exc_info=True)


def event_record_many(events: list[Event]) -> list[Event]:
    """Insert events whose `seq` the caller allocated; publish them, in order, after commit."""
    if not events:
        return events
    created = Event.objects.bulk_create(events)
    transaction.on_commit(lambda: [publish_event(event) for event in created])
    return created
