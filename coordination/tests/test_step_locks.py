"""Locks tied to a step's lease: declared files come with it, renew with its heartbeats and end with it."""

from datetime import timedelta

import pytest
from django.utils import timezone

from coordination.models import Event, FileLock, Step
from coordination.services import leases, pull, reports, workflow_control, workflow_creation
from coordination.tests.agent_calls import acquire

pytestmark = pytest.mark.django_db


def _pull(agent):
    return pull.step_pull(agent=agent.agent, roles=["developer"])


class StepLockTests:
    def test_it_grants_the_declared_files_with_the_lease(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A", files=(("src/a.py", "write"), ("spec.md", "read")))))
        lease = _pull(developer)
        locks = {lock.path: lock for lock in FileLock.objects.filter(step=lease.step)}
        assert set(locks) == {"src/a.py", "spec.md"}
        assert locks["spec.md"].mode == "read" and locks["src/a.py"].mode == "write"
        assert all(lock.expires_at == lease.step.lease_expires_at for lock in locks.values())
        event = Event.objects.get(kind="step.leased")
        assert {lock["path"] for lock in event.data["locks"]} == {"src/a.py", "spec.md"}

    def test_it_never_runs_two_writers_of_one_file_together_while_a_third_step_runs_alongside(
            self, developer, step, workflow_spec):
        developer.agent.capacity = 3
        developer.agent.save()
        workflow_creation.workflow_create(spec=workflow_spec(
            step("R1", files=(("report.md", "write"),)),
            step("R2", files=(("report.md", "write"),)),
            step("X", files=(("other.md", "write"),)),
        ))
        first = _pull(developer)
        second = _pull(developer)
        assert {first.step.key, second.step.key} == {"R1", "X"}
        assert isinstance(_pull(developer), pull.PullMiss)  # R2 waits for report.md
        r1 = first if first.step.key == "R1" else second
        reports.step_report(step_id=r1.step.id, agent=developer.agent, lease_token=r1.token,
                             outcome=reports.Outcome(status="completed"))
        third = _pull(developer)
        assert third.step.key == "R2"

    def test_it_passes_over_a_step_blocked_by_an_agents_lock(self, developer, other_developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A", files=(("src/",  "write"),)), step("B")))
        acquire(other_developer, ["src/app.py"], "read")
        lease = _pull(developer)
        assert lease.step.key == "B"

    @pytest.mark.parametrize("end", ["completed", "failed", "released", "cancelled", "expired"])
    def test_it_ends_the_locks_with_the_step(self, developer, other_developer, end, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", files=(("a.md", "write"),), max_attempts=1)))
        lease = _pull(developer)
        [extra] = acquire(developer, ["notes/"], step_id=lease.step.id, lease_token=lease.token)
        assert extra.step_id == lease.step.id and extra.expires_at == lease.step.lease_expires_at
        if end in ("completed", "failed"):
            reports.step_report(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token,
                                 outcome=reports.Outcome(status=end))
        elif end == "released":
            leases.step_release(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token)
        elif end == "cancelled":
            workflow_control.workflow_cancel(workflow_id=workflow.id)
        else:
            Step.objects.filter(id=lease.step.id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
            leases.leases_sweep()
        assert not FileLock.objects.filter(step=lease.step, released_at__isnull=True).exists()
        acquire(other_developer, ["a.md", "notes/x"])  # free again
        assert Event.objects.filter(kind="locks.released", step=lease.step).exists()

    def test_it_renews_the_steps_locks_on_a_heartbeat(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A", files=(("a.md", "write"),))))
        lease = _pull(developer)
        FileLock.objects.filter(step=lease.step).update(expires_at=timezone.now() + timedelta(seconds=3))
        result = leases.step_heartbeat(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token)
        assert FileLock.objects.get(step=lease.step).expires_at == result["expires_at"]

    def test_it_needs_the_current_lease_token_for_locks_under_a_lease(self, developer, other_developer, step,
                                                                      workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        lease = _pull(developer)
        response = developer.client().post("/v1/locks", {"paths": ["x"], "mode": "write", "step_id": str(lease.step.id),
                                                         "lease_token": "ls_wrong"}, format="json")
        assert response.status_code == 409 and response.json()["error"] == "stale_lease"
        response = other_developer.client().post("/v1/locks", {"paths": ["x"], "mode": "write",
                                                               "step_id": str(lease.step.id),
                                                               "lease_token": lease.token}, format="json")
        assert response.status_code == 403
        response = developer.client().post("/v1/locks", {"paths": ["x"], "mode": "write",
                                                         "step_id": str(lease.step.id)}, format="json")
        assert response.status_code == 400
