"""Heartbeats, reports, expiry, retries and workflow control."""

from datetime import timedelta

import pytest
from django.utils import timezone

from coordination.services import leases, workflow_control, workflow_creation
from coordination.models import Attempt, AttemptOutcome, Event, Iteration, Result, Step, StepStatus, Workflow
from coordination.tests.factories import step, workflow_spec

pytestmark = pytest.mark.django_db


def pull(agent, roles="developer"):
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
    Step.objects.filter(id=step_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    return leases.leases_sweep()


class HeartbeatTests:
    def test_it_extends_the_lease_and_stores_iterations(self, developer):
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

    def test_it_refuses_an_expired_lease(self, developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, token = pull(developer)
        Step.objects.filter(id=step_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        response = heartbeat(developer, step_id, token)
        assert response.status_code == 409
        assert response.json()["error"] == "stale_lease"

    def test_it_refuses_a_wrong_token_from_the_holder(self, developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, _ = pull(developer)
        assert heartbeat(developer, step_id, "ls_forged").status_code == 409


class ReportTests:
    def test_it_completes_the_step_and_releases_dependents(self, developer):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), step("C", "A"), step("D", "B")))
        step_id, token = pull(developer)
        response = report(developer, step_id, token, final_result="the answer", outputs={"k": 1},
                          iterations=[{"iteration": 1, "thought": "t", "action": "finish", "observation": ""}],
                          usage={"model": "m", "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.01},
                          execution_time_s=1.5)
        assert response.status_code == 200
        assert response.json() == {"step_id": step_id, "status": "completed", "workflow_status": "running",
                                   "released": ["B", "C"]}
        statuses = dict(Step.objects.filter(workflow=workflow).values_list("key", "status"))
        assert statuses == {"A": "completed", "B": "ready", "C": "ready", "D": "pending"}
        result = Result.objects.get(step_id=step_id)
        assert (result.final_result, result.prompt_tokens, result.completion_tokens) == ("the answer", 10, 5)
        assert result.attempt.iterations.count() == 1
        workflow.refresh_from_db()
        assert (workflow.n_completed, workflow.n_ready, workflow.n_pending, workflow.spent_tokens) == (1, 2, 1, 15)

    def test_a_repeated_report_returns_the_same_answer_and_changes_nothing(self, developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A")))
        step_id, token = pull(developer)
        first = report(developer, step_id, token, final_result="x")
        events = Event.objects.count()
        again = report(developer, step_id, token, final_result="x")
        assert again.status_code == 200 and again.json() == first.json()
        assert Event.objects.count() == events
        assert Result.objects.count() == 1

    def test_the_last_step_completes_the_workflow(self, developer):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A")))
        for expected in ("running", "completed"):
            step_id, token = pull(developer)
            assert report(developer, step_id, token).json()["workflow_status"] == expected
        workflow.refresh_from_db()
        assert workflow.status == "completed" and workflow.finished_at is not None
        assert workflow.progress == 1.0
        assert Event.objects.filter(workflow=workflow, kind="workflow.completed").exists()

    def test_an_expired_lease_goes_to_another_agent_and_the_late_report_is_refused(self, developer, other_developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, first_token = pull(developer)
        assert expire(step_id) == 1
        step_id_again, second_token = pull(other_developer)
        assert step_id_again == step_id
        late = report(developer, step_id, first_token, final_result="zombie result")
        assert late.status_code == 409 and late.json()["error"] == "stale_lease"
        assert Event.objects.filter(kind="step.stale_report", agent=developer.agent).exists()
        assert report(other_developer, step_id, second_token, final_result="real result").status_code == 200
        stored = Step.objects.get(id=step_id)
        assert stored.final_result == "real result" and stored.attempt == 2
        assert list(Attempt.objects.filter(step_id=step_id).order_by("number").values_list("agent__name", "outcome")) == [
            ("dev-1", AttemptOutcome.EXPIRED), ("dev-2", AttemptOutcome.COMPLETED)]

    def test_a_retryable_failure_backs_off_then_fails_for_good_and_skips_downstream(self, developer, settings):
        settings.AM_RETRY_BACKOFF_BASE_S = 30
        workflow = workflow_creation.workflow_create(
            spec=workflow_spec(step("A", max_attempts=3), step("B", "A"), step("C", "B"), step("X", priority=5))
        )
        x_id, x_token = pull(developer)
        assert Step.objects.get(id=x_id).key == "X"
        report(developer, x_id, x_token)
        a_id, token = pull(developer)
        assert Step.objects.get(id=a_id).key == "A"
        # Attempt 1 fails, retryable: ready again at once (no backoff after the first attempt).
        assert report(developer, a_id, token, status="failed", error="flaky", retryable=True).json()["status"] == "ready"
        a_id, token = pull(developer)
        # Attempt 2 fails, retryable: ready after a 30 s backoff.
        response = report(developer, a_id, token, status="failed", error="flaky", retryable=True)
        assert response.json()["status"] == "ready"
        step_a = Step.objects.get(id=a_id)
        assert step_a.available_at > timezone.now() + timedelta(seconds=25)
        assert developer.client().get("/v1/tasks/developer/ready").status_code == 204
        Step.objects.filter(id=a_id).update(available_at=timezone.now())
        a_id, token = pull(developer)
        # Attempt 3 of 3 fails: failed for good, B and C skipped, the workflow failed.
        response = report(developer, a_id, token, status="failed", error="still flaky", retryable=True)
        assert response.json() == {"step_id": a_id, "status": "failed", "workflow_status": "failed", "released": []}
        statuses = dict(Step.objects.filter(workflow=workflow).values_list("key", "status"))
        assert statuses == {"A": "failed", "B": "skipped", "C": "skipped", "X": "completed"}
        workflow.refresh_from_db()
        assert workflow.status == "failed" and "1 step(s) failed" in workflow.failure_reason
        assert (workflow.n_failed, workflow.n_skipped, workflow.n_completed) == (1, 2, 1)

        # Retry of the failed step brings its skipped dependents back.
        response = developer.client().post(f"/v1/steps/{a_id}/retry")
        assert response.status_code == 403  # agents without --can-submit may not
        workflow_control.step_retry(step_id=a_id)
        statuses = dict(Step.objects.filter(workflow=workflow).values_list("key", "status"))
        assert statuses == {"A": "ready", "B": "pending", "C": "pending", "X": "completed"}
        workflow.refresh_from_db()
        assert workflow.status == "running"
        assert (workflow.n_ready, workflow.n_pending, workflow.n_failed, workflow.n_skipped) == (1, 2, 0, 0)
        for key in ("A", "B", "C"):
            step_id, token = pull(developer)
            assert Step.objects.get(id=step_id).key == key
            report(developer, step_id, token)
        workflow.refresh_from_db()
        assert workflow.status == "completed"

    def test_a_non_retryable_failure_fails_at_once(self, developer):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", max_attempts=5), step("B", "A")))
        step_id, token = pull(developer)
        response = report(developer, step_id, token, status="failed", error="impossible", retryable=False)
        assert response.json()["status"] == "failed"
        assert dict(Step.objects.filter(workflow=workflow).values_list("key", "status")) == {"A": "failed", "B": "skipped"}

    def test_expiry_with_no_attempts_left_fails_the_step(self, developer):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", max_attempts=1)))
        step_id, _ = pull(developer)
        expire(step_id)
        assert Step.objects.get(id=step_id).status == StepStatus.FAILED
        workflow.refresh_from_db()
        assert workflow.status == "failed"

    def test_the_sweep_leaves_live_leases_alone(self, developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, _ = pull(developer)
        assert leases.leases_sweep() == 0
        assert Step.objects.get(id=step_id).status == StepStatus.IN_PROGRESS


class WorkflowControlTests:
    def test_cancel_stops_everything_and_tells_running_agents(self, developer, owner_client):
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

    def test_pause_asks_agents_to_stop_and_a_hand_back_costs_no_attempt(self, developer, owner_client):
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

    def test_a_lease_that_runs_out_while_paused_is_not_charged(self, developer, owner):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", max_attempts=1)))
        step_id, _ = pull(developer)
        workflow_control.workflow_pause(workflow_id=workflow.id, user=owner)
        expire(step_id)
        assert Step.objects.get(id=step_id).status == StepStatus.READY

    def test_resume_and_pause_refuse_the_wrong_state(self, owner_client):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        assert owner_client.post(f"/v1/workflows/{workflow.id}/resume").status_code == 200  # running: no-op
        workflow_control.workflow_cancel(workflow_id=workflow.id)
        response = owner_client.post(f"/v1/workflows/{workflow.id}/pause")
        assert response.status_code == 409 and response.json()["error"] == "invalid_state"

    def test_events_are_ordered_and_paged(self, developer, owner_client):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A")))
        step_id, token = pull(developer)
        report(developer, step_id, token)
        body = owner_client.get(f"/v1/workflows/{workflow.id}/events").json()
        kinds = [e["kind"] for e in body["events"]]
        assert kinds == ["workflow.created", "step.leased", "step.completed", "steps.released"]
        assert [e["seq"] for e in body["events"]] == [1, 2, 3, 4]
        after = owner_client.get(f"/v1/workflows/{workflow.id}/events?after=2&limit=1").json()
        assert [e["seq"] for e in after["events"]] == [3] and after["has_more"] is True
        assert Workflow.objects.get(id=workflow.id).event_seq == 4


class UsageTests:
    def test_usage_is_summed_per_step_workflow_and_agent(self, developer, other_developer, owner_client):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        for agent, tokens in ((developer, (100, 20)), (other_developer, (7, 3))):
            step_id, token = pull(agent)
            report(agent, step_id, token, usage={"model": "m", "prompt_tokens": tokens[0],
                                                "completion_tokens": tokens[1], "cost_usd": 0.5})
        workflow.refresh_from_db()
        assert workflow.spent_tokens == 130 and float(workflow.spent_usd) == 1.0
        agents = {a["name"]: a for a in owner_client.get("/v1/agents").json()}
        assert agents["dev-1"]["tokens_used"] == 120 and agents["dev-2"]["tokens_used"] == 10
        assert agents["dev-1"]["cost_usd"] == 0.5
