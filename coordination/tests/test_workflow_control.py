"""A person controls a workflow: cancel, pause and resume, and what running agents are told."""

import pytest

from coordination.models import Attempt, AttemptOutcome, Event, Step, StepStatus, Workflow
from coordination.services import workflow_control, workflow_creation
from coordination.tests.agent_calls import expire, heartbeat, pull, report

pytestmark = pytest.mark.django_db


def _state(workflow) -> tuple:
    """What a refused or idle control action must leave as it was."""
    row = Workflow.objects.get(id=workflow.id)
    steps = dict(Step.objects.filter(workflow=workflow).values_list("key", "status"))
    events = Event.objects.filter(workflow=workflow)
    return row.status, row.paused_reason, row.updated_at, steps, events.count(), events.latest("seq").seq


class WorkflowControlTests:
    def test_it_cancels_everything_and_tells_running_agents(self, developer, owner_client, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B"), step("C", "A")))
        step_id, token = pull(developer)
        response = owner_client.post(f"/v1/workflows/{workflow.id}/cancel")
        assert response.status_code == 200 and response.json()["status"] == "cancelled"
        assert heartbeat(developer, step_id, token).json()["cancel"] is True
        assert report(developer, step_id, token).status_code == 409
        workflow.refresh_from_db()
        assert (workflow.n_cancelled, workflow.total_steps) == (3, 3)
        assert Attempt.objects.get(step_id=step_id).outcome == AttemptOutcome.CANCELLED
        assert owner_client.post(f"/v1/workflows/{workflow.id}/cancel").status_code == 409

    def test_it_pauses_asking_agents_to_stop_and_a_hand_back_costs_no_attempt(self, developer, owner_client, step,
                                                                              workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", max_attempts=1)))
        step_id, token = pull(developer)
        assert owner_client.post(f"/v1/workflows/{workflow.id}/pause").json()["status"] == "paused"
        assert heartbeat(developer, step_id, token).json()["cancel"] is True
        assert developer.client().get("/v1/tasks/developer/ready").status_code == 204
        response = developer.client().post(f"/v1/steps/{step_id}/release", {"lease_token": token}, format="json")
        assert response.status_code == 200 and response.json()["status"] == "ready"
        owner_client.post(f"/v1/workflows/{workflow.id}/resume")
        again_id, again_token = pull(developer)
        assert again_id == step_id  # max_attempts=1, yet the handed-back attempt was not charged
        assert report(developer, again_id, again_token).status_code == 200

    def test_it_does_not_charge_a_lease_that_runs_out_while_paused(self, developer, owner, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", max_attempts=1)))
        step_id, _ = pull(developer)
        workflow_control.workflow_pause(workflow_id=workflow.id, user=owner)
        expire(step_id)
        assert Step.objects.get(id=step_id).status == StepStatus.READY

    def test_it_refuses_to_resume_or_pause_the_wrong_state(self, owner_client, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        # Resuming a running workflow, or pausing a paused one, is accepted and changes nothing.
        running = _state(workflow)
        response = owner_client.post(f"/v1/workflows/{workflow.id}/resume")
        assert response.status_code == 200 and response.json()["status"] == "running"
        assert _state(workflow) == running
        assert owner_client.post(f"/v1/workflows/{workflow.id}/pause").json()["status"] == "paused"
        paused = _state(workflow)
        response = owner_client.post(f"/v1/workflows/{workflow.id}/pause")
        assert response.status_code == 200 and response.json()["status"] == "paused"
        assert _state(workflow) == paused
        assert owner_client.post(f"/v1/workflows/{workflow.id}/resume").json()["status"] == "running"
        # A cancelled workflow can be neither paused nor resumed: 409, and nothing changes.
        workflow_control.workflow_cancel(workflow_id=workflow.id)
        cancelled = _state(workflow)
        assert cancelled[0] == "cancelled" and cancelled[3] == {"A": "cancelled"}
        for action in ("pause", "resume"):
            response = owner_client.post(f"/v1/workflows/{workflow.id}/{action}")
            assert response.status_code == 409, action
            assert response.json()["error"] == "invalid_state"
            assert "is cancelled" in response.json()["detail"]
            assert _state(workflow) == cancelled, action
