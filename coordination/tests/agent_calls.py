"""What an agent does in the tests, one call each: over the REST API (pull, report, heartbeat) or through the
lock service; and a lease left to run out."""

from datetime import timedelta

from django.utils import timezone

from coordination.models import Step
from coordination.services import file_locks, leases


def pull(agent, roles="developer"):
    """Pull a step through the API: its id and lease token."""
    response = agent.client().get(f"/v1/tasks/{roles}/ready")
    assert response.status_code == 200, response.content
    body = response.json()
    return body["step"]["id"], body["lease"]["token"]


def report(agent, step_id, token, status="completed", **fields):
    return agent.client().post(
        "/v1/report_result", {"step_id": step_id, "lease_token": token, "status": status, **fields}, format="json"
    )


def heartbeat(agent, step_id, token, **fields):
    return agent.client().post(f"/v1/steps/{step_id}/heartbeat", {"lease_token": token, **fields}, format="json")


def expire(step_id):
    """Let the step's lease run out and sweep: the number of leases the sweep expired."""
    Step.objects.filter(id=step_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    return leases.leases_sweep()


def acquire(agent, paths, mode="write", **extra):
    """Take locks for an agent through the service (`LockConflict` when refused)."""
    return file_locks.locks_acquire(agent=agent.agent, paths=paths, mode=mode, **extra)
