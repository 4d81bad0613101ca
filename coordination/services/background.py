"""Work handed to Celery once the change that asks for it commits."""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction

logger = logging.getLogger(__name__)


def enqueue_after_commit(task_name: str, *args: Any) -> None:
    """Send a Celery task once the transaction commits; a broker outage is logged, not raised
    (Celery beat re-sends planning and audits that were never picked up)."""

    def send() -> None:
        from am_project.celery import app

        try:
            app.send_task(task_name, args=[str(arg) for arg in args])
        except Exception:  # noqa: BLE001 - the change is committed; the beat sweep retries the work
            logger.warning("Could not queue %s%s; it will be retried.", task_name, args, exc_info=True)

    transaction.on_commit(send)
