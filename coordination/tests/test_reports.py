"""Reports: a result completes the step and releases dependents; failures back off, fail for good, and are retried."""

from datetime import timedelta

import pytest
from django.utils import timezone

from coordination.models import Event, Result, Step
from coordination.services import workflow_control, workflow_creation
from coordination.tests.agent_calls import pull, report

pytestmark = pytest.mark.django_db


class ReportTests:
    def test_it_completes_the_step_and_releases_dependents(self, developer, step, workflow_spec):
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

    def test_it_answers_a_repeated_report_the_same_and_changes_nothing(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A")))
        step_id, token = pull(developer)
        first = report(developer, step_id, token, final_result="x")
        events = Event.objects.count()
        again = report(developer, step_id, token, final_result="x")
        assert again.status_code == 200 and again.json() == first.json()
        assert Event.objects.count() == events
        assert Result.objects.count() == 1

    def test_it_completes_the_workflow_with_its_last_step(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A")))
        for expected in ("running", "completed"):
            step_id, token = pull(developer)
            assert report(developer, step_id, token).json()["workflow_status"] == expected
        workflow.refresh_from_db()
        assert workflow.status == "completed" and workflow.finished_at is not None
        assert workflow.progress == 1.0
        assert Event.objects.filter(workflow=workflow, kind="workflow.completed").exists()

    def test_it_backs_off_a_retryable_failure_then_fails_for_good_and_skips_downstream(self, developer, settings, step,
                                                                                      workflow_spec):
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

    def test_it_fails_a_non_retryable_failure_at_once(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", max_attempts=5), step("B", "A")))
        step_id, token = pull(developer)
        response = report(developer, step_id, token, status="failed", error="impossible", retryable=False)
        assert response.json()["status"] == "failed"
        assert dict(Step.objects.filter(workflow=workflow).values_list("key", "status")) == {"A": "failed", "B": "skipped"}


class LockingStatementPlanTests:
    @pytest.mark.parametrize("along", ["NONE", "DEPENDENTS", "DOWNSTREAM"])
    def test_the_step_locking_statement_reads_steps_by_id_under_a_large_history(self, along, step, workflow_spec):
        """Every heartbeat and report locks its step (and those along it) first: never by reading every step."""
        import re
        import uuid

        from django.db import connection
        from django.utils import timezone

        from coordination.models import Step, StepStatus
        from coordination.services import lock_order, workflow_creation

        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), step("C", "B")))
        Step.objects.bulk_create(
            [Step(workflow=workflow, key=f"done{i}", name="x", role="developer", status=StepStatus.COMPLETED,
                  finished_at=timezone.now()) for i in range(20000)],
            batch_size=5000,
        )
        first = Step.objects.get(workflow=workflow, key="A")
        sql = lock_order.LOCKED_STEP_SQL[(lock_order.Along[along], True)]
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE coordination_step")
            cursor.execute("EXPLAIN " + sql, {"step": first.id, "hash": "x", "agent": uuid.uuid4()})
            plan = "\n".join(row[0] for row in cursor.fetchall())
        assert not re.search(r"Seq Scan on coordination_step\s", plan), plan  # (stepdependency is tiny here)
        locked = lock_order.locked_step(first.id, along=lock_order.Along[along])
        assert locked.id == first.id
