"""Celery tasks: thin wrappers that call services."""

from celery import shared_task

from coordination import services


@shared_task(name="coordination.tasks.sweep_expired", ignore_result=True)
def sweep_expired() -> dict[str, int]:
    """Expire leases and file locks past their end (Celery beat, every AM_SWEEP_INTERVAL_S)."""
    return {"leases": services.leases_sweep(), "locks": services.locks_sweep()}
