"""Heartbeats: they extend the lease, store the agent's iterations once, and refuse a stale lease."""

from datetime import timedelta

import pytest
from django.utils import timezone

from coordination.models import Event, Iteration, Step
from coordination.services import workflow_creation
from coordination.tests.agent_calls import heartbeat, pull

pytestmark = pytest.mark.django_db


class HeartbeatTests:
    def test_it_extends_the_lease_and_stores_iterations(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A", lease_ttl_s=60)))
        step_id, token = pull(developer)
        Step.objects.filter(id=step_id).update(lease_expires_at=timezone.now() + timedelta(seconds=5))
        response = heartbeat(developer, step_id, token, iterations=[
            {"iteration": 1, "thought": "look around", "action": "list_files", "observation": "empty"},
            {"iteration": 2, "thought": "write", "action": "write_file", "observation": "ok"},
        ])
        assert response.status_code == 200
        assert response.json()["cancel"] is False
        assert Step.objects.get(id=step_id).lease_expires_at > timezone.now() + timedelta(seconds=50)
        assert list(Iteration.objects.order_by("index").values_list("index", "action")) == [
            (1, "list_files"), (2, "write_file")]
        # Sent again (a retried heartbeat), nothing is duplicated.
        heartbeat(developer, step_id, token, iterations=[{"iteration": 2, "thought": "write"}])
        assert Iteration.objects.count() == 2
        assert Event.objects.filter(kind="step.progress").count() == 1

    def test_it_refuses_an_expired_lease(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, token = pull(developer)
        Step.objects.filter(id=step_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        response = heartbeat(developer, step_id, token)
        assert response.status_code == 409
        assert response.json()["error"] == "stale_lease"

    def test_it_refuses_a_wrong_token_from_the_holder(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, _ = pull(developer)
        assert heartbeat(developer, step_id, "ls_forged").status_code == 409
