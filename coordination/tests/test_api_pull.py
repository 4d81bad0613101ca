import time
import uuid
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from coordination.services import pull, reports, workflow_control, workflow_creation
from coordination.models import Attempt, Step, StepStatus, Workflow

pytestmark = pytest.mark.django_db


def _pull(agent, roles="developer", **headers):
    return agent.client().get(f"/v1/tasks/{roles}/ready", **headers)


class PullTests:
    def test_it_leases_a_ready_step_with_its_lease_and_workflow(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", files=(("src/a.py", "write"),))))
        response = _pull(developer)
        assert response.status_code == 200
        assert response["Cache-Control"] == "no-store"
        body = response.json()
        assert body["step"]["key"] == "A"
        assert body["step"]["attempt"] == 1
        assert body["step"]["files"] == [{"path": "src/a.py", "mode": "write"}]
        assert body["workflow"] == {"id": str(workflow.id), "name": workflow.name, "project": "default"}
        assert body["lease"]["ttl_s"] == 120 and body["lease"]["token"].startswith("ls_")
        assert body["lease"]["expires_at"].endswith("Z")
        stored = Step.objects.get(id=body["step"]["id"])
        assert stored.status == StepStatus.IN_PROGRESS and stored.lease_agent == developer.agent
        assert body["lease"]["token"] not in stored.lease_token_hash
        workflow.refresh_from_db()
        assert (workflow.n_ready, workflow.n_in_progress) == (0, 1)

    def test_it_answers_204_when_nothing_is_ready(self, developer):
        response = _pull(developer)
        assert response.status_code == 204
        assert response["Cache-Control"] == "no-store"

    def test_it_hands_out_the_highest_priority_then_the_oldest(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("old"), step("new"), name="first"))
        workflow_creation.workflow_create(spec=workflow_spec(step("urgent", priority=5), name="second"))
        workflow_creation.workflow_create(spec=workflow_spec(step("vip"), name="third", priority=10))
        keys = []
        for _ in range(4):
            body = _pull(developer).json()
            keys.append(body["step"]["key"])
            reports.step_report(step_id=body["step"]["id"], agent=developer.agent,
                                 lease_token=body["lease"]["token"], outcome=reports.Outcome(status="completed"))
        assert keys == ["vip", "urgent", "old", "new"]

    def test_it_picks_the_best_step_across_several_roles(self, make_agent, step, workflow_spec):
        agent = make_agent("multi", ["developer", "tester"], capacity=5)
        workflow_creation.workflow_create(spec=workflow_spec(step("d"), step("t", role="tester", priority=3)))
        assert _pull(agent, "developer,tester").json()["step"]["key"] == "t"
        assert _pull(agent, "developer,tester").json()["step"]["key"] == "d"

    def test_it_refuses_a_role_the_agent_does_not_hold(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A", role="tester")))
        response = _pull(developer, "developer,tester")
        assert response.status_code == 403
        assert response.json()["error"] == "forbidden" and "tester" in response.json()["detail"]

    def test_it_refuses_a_malformed_role(self, developer):
        response = _pull(developer, "Dev%20Ops")
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_request"

    @pytest.mark.parametrize("wait", ["abc", "-1", "31", "nan"])
    def test_it_refuses_a_bad_wait(self, developer, wait):
        response = developer.client().get(f"/v1/tasks/developer/ready?wait={wait}")
        assert response.status_code == 400

    def test_it_refuses_past_capacity(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B"), step("C")))
        assert _pull(developer).status_code == 200
        assert _pull(developer).status_code == 200
        response = _pull(developer)
        assert response.status_code == 429
        assert response.json()["error"] == "at_capacity"
        assert response.json()["capacity"] == 2

    def test_it_returns_the_same_lease_for_a_repeated_idempotency_key(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        first = _pull(developer, HTTP_IDEMPOTENCY_KEY="pull-1").json()
        again = _pull(developer, HTTP_IDEMPOTENCY_KEY="pull-1").json()
        assert again["step"]["id"] == first["step"]["id"]
        assert again["lease"]["token"] == first["lease"]["token"]
        assert Attempt.objects.count() == 1
        reports.step_report(step_id=first["step"]["id"], agent=developer.agent,
                             lease_token=first["lease"]["token"], outcome=reports.Outcome(status="completed"))
        reused = _pull(developer, HTTP_IDEMPOTENCY_KEY="pull-1")
        assert reused.status_code == 409

    def test_it_gives_the_results_of_dependencies_as_inputs(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B"), step("C", "A", "B")))
        for _ in range(2):
            body = _pull(developer).json()
            reports.step_report(
                step_id=body["step"]["id"], agent=developer.agent, lease_token=body["lease"]["token"],
                outcome=reports.Outcome(status="completed", final_result=f"result of {body['step']['key']}",
                                         outputs={"n": body["step"]["key"]}),
            )
        body = _pull(developer).json()
        assert body["step"]["key"] == "C"
        assert body["step"]["inputs"] == {
            "A": {"final_result": "result of A", "outputs": {"n": "A"}},
            "B": {"final_result": "result of B", "outputs": {"n": "B"}},
        }

    def test_it_hands_out_nothing_from_a_paused_workflow(self, developer, owner, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        workflow_control.workflow_pause(workflow_id=workflow.id, user=owner)
        assert _pull(developer).status_code == 204
        workflow_control.workflow_resume(workflow_id=workflow.id, user=owner)
        assert _pull(developer).status_code == 200

    def test_it_waits_out_a_backoff(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        available_at = timezone.now() + timedelta(seconds=1)
        Step.objects.filter(workflow=workflow).update(available_at=available_at)
        assert _pull(developer).status_code == 204  # backing off: not handed out yet
        started = time.monotonic()
        response = developer.client().get("/v1/tasks/developer/ready?wait=10")
        waited = time.monotonic() - started
        assert response.status_code == 200, response.content
        assert response.json()["step"]["key"] == "A"
        assert Step.objects.get(workflow=workflow).started_at >= available_at  # handed out once the backoff ended
        assert waited < 5  # the long poll woke when the backoff ended, not at its deadline

    @pytest.mark.parametrize("statement", ["one role", "several roles"])
    def test_the_claim_uses_the_ready_queue_index_under_a_large_history(self, developer, statement, step,
                                                                        workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("live")))
        now = timezone.now()
        Step.objects.bulk_create(
            [Step(workflow=workflow, key=f"done{i}", name="x", role="developer", status=StepStatus.COMPLETED,
                  finished_at=now) for i in range(20000)],
            batch_size=5000,
        )
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE coordination_step")
            sql = pull.CLAIM_ONE_ROLE_SQL if statement == "one role" else pull.CLAIM_ROLES_SQL
            cursor.execute("EXPLAIN " + sql, {"agent": uuid.uuid4(), "capacity": 1, "count": 1, "role": "developer",
                                              "roles": ["developer", "tester"], "now": now, "passed_over": []})
            plan = "\n".join(row[0] for row in cursor.fetchall())
        # The one-role claim reads the ready queue in order; several roles may instead go through the running
        # workflows' ready steps. Either way no plan reads the 20,000 finished steps.
        assert "Seq Scan on coordination_step" not in plan, plan
        if statement == "one role":
            assert "step_ready_queue" in plan, plan
        else:
            assert "step_ready_queue" in plan or (
                "step_workflow_status" in plan and "status)::text = 'ready'::text" in plan), plan
        Workflow.objects.filter(id=workflow.id).update()


class AnswerShapeTests:
    def test_a_pull_and_a_report_answer_exactly_what_their_serializers_say(self, developer, step, workflow_spec):
        from coordination.api import serializers as s
        from coordination.tests.agent_calls import report

        workflow_creation.workflow_create(spec=workflow_spec(
            step("A"), step("B", "A", files=(("src/b.py", "write"), ("docs/", "read"))), step("C", "A")))
        first = _pull(developer).json()
        result = reports.step_report(step_id=uuid.UUID(first["step"]["id"]), agent=developer.agent,
                                     lease_token=first["lease"]["token"],
                                     outcome=reports.Outcome(status="completed", final_result="a"))
        assert s.report_payload(result) == s.ReportOutSerializer(result).data
        assert report(developer, first["step"]["id"], first["lease"]["token"]).json() == s.report_payload(result)
        leases = pull.steps_pull(agent=developer.agent, roles=["developer"], count=2)
        assert any(lease.locks for lease in leases) and all(lease.inputs for lease in leases)
        for lease in leases:
            assert s.pull_payload(lease) == s.PullOutSerializer(s.pull_payload(lease)).data
            assert s.pull_payload(lease) == dict(s.PullOutSerializer(_as_objects(lease)).data)


def _as_objects(lease):
    """The payload a serializer would be handed with Python objects (UUIDs, datetimes) in it."""
    step, workflow = lease.step, lease.step.workflow
    return {"step": {"id": step.id, "key": step.key, "name": step.name, "description": step.description,
                     "role": step.role, "attempt": step.attempt, "files": step.files, "inputs": lease.inputs},
            "workflow": {"id": workflow.id, "name": workflow.name, "project": workflow.project.name},
            "lease": {"token": lease.token, "expires_at": lease.expires_at, "ttl_s": step.lease_ttl_s,
                      "locks": [{"id": lock.id, "path": lock.path, "mode": lock.mode, "fencing": lock.fencing,
                                 "expires_at": lock.expires_at} for lock in lease.locks],
                      "traceparent": None}}
