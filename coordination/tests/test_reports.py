"""Reports: a result completes the step and releases dependents; failures back off, fail for good, and are retried."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agents.llm.base import Usage
from coordination import tasks
from coordination.errors import Busy
from coordination.models import AgentUsage, Attempt, Event, FileLock, Result, Step
from coordination.services import reports, workflow_control, workflow_creation
from coordination.services.leases import IterationIn
from coordination.tests.agent_calls import acquire, pull, report

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

    def test_the_completion_finds_its_attempt_by_the_lease_whatever_the_agents_history(
            self, developer, step, workflow_spec):
        """A report's cost must not grow with its agent's history (its attempts)."""
        import json
        import uuid

        from django.db import connection
        from django.utils import timezone

        from coordination.models import Attempt, Step, StepStatus

        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        now = timezone.now()
        done = Step.objects.bulk_create(
            [Step(workflow=workflow, key=f"done{i}", name="x", role="developer", status=StepStatus.COMPLETED,
                  finished_at=now) for i in range(5000)], batch_size=5000)
        Attempt.objects.bulk_create(
            [Attempt(step=s, agent=developer.agent, number=1, lease_token_hash=uuid.uuid4().hex, expires_at=now,
                     ended_at=now, outcome="completed") for s in done], batch_size=5000)
        step_id, _ = pull(developer)
        params = {"now": now, "step": step_id, "agent": developer.agent.id, "hash": "x", "attempt": None,
                  "actor": "{}", "result": uuid.uuid4(), "final_result": "", "outputs": "{}", "usd": 0, "tokens": 0,
                  "model": "", "prompt_tokens": 0, "completion_tokens": 0, "execution_time_s": None,
                  "n_completed": 1, "indexes": [], "thoughts": [], "actions": [], "observations": []}
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE coordination_attempt")
            cursor.execute("ANALYZE coordination_step")
            cursor.execute("EXPLAIN (FORMAT JSON) " + reports.COMPLETE_SQL["in_progress"], params)
            plan = cursor.fetchone()[0]

        def nodes(node):
            yield node
            for child in node.get("Plans", []):
                yield from nodes(child)

        every = list(nodes(plan[0]["Plan"]))
        scans = [n for n in every if n.get("Relation Name") == "coordination_attempt" and "Scan" in n["Node Type"]]
        # Its attempt by the step's lease (primary key, or the step's attempt numbers), never by the agent.
        assert scans and all(n["Node Type"] != "Seq Scan" for n in scans), json.dumps(scans)
        indexes = {n["Index Name"] for n in every if "Index Name" in n}
        assert not [name for name in indexes if name.startswith("coordination_attempt_agent")], indexes


def _outcome(**fields) -> reports.Outcome:
    return reports.Outcome(status="completed", final_result="done", **fields)


class OneStatementReportTests:
    """The common report (completed, by the live lease's holder) is one statement after its step's locks; the rest
    follows the full path."""

    def test_a_completed_report_is_one_statement_that_changes_everything_it_should(self, developer, step,
                                                                                  workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), step("C")))
        step_id, token = pull(developer)
        outcome = _outcome(outputs={"k": 1}, execution_time_s=2.0,
                           iterations=[IterationIn(index=1, thought="t", action="a", observation="o"),
                                       IterationIn(index=2, thought="t2", action="finish")],
                           usage=Usage(model="m", prompt_tokens=7, completion_tokens=3, cost_usd=Decimal("0.25")))
        with CaptureQueriesContext(connection) as queries:
            answer = reports.step_report(step_id=step_id, agent=developer.agent, lease_token=token, outcome=outcome)
        # Sent together: the step and its dependents locked, then the report.
        assert len(queries) == 2, [query["sql"][:80] for query in queries]
        assert "FOR UPDATE" in queries[0]["sql"] and "INSERT INTO coordination_result" in queries[1]["sql"]
        assert answer == {"step_id": step_id, "status": "completed", "workflow_status": "running", "released": ["B"]}
        a = Step.objects.get(id=step_id)
        assert (a.status, a.final_result, a.outputs, a.lease_agent_id, a.lease_attempt_id) == (
            "completed", "done", {"k": 1}, None, None)
        attempt = Attempt.objects.get(step_id=step_id)
        assert (attempt.outcome, attempt.ended_at is not None) == ("completed", True)
        assert list(attempt.iterations.order_by("index").values_list("index", "observation")) == [(1, "o"), (2, "")]
        assert Step.objects.get(workflow=workflow, key="B").status == "ready"
        result = Result.objects.get(step_id=step_id)
        assert (result.response, result.cost_usd, result.execution_time_s) == (answer, Decimal("0.25"), 2.0)
        usage = AgentUsage.objects.get(agent=developer.agent)
        assert (usage.prompt_tokens, usage.completion_tokens, usage.steps_completed) == (7, 3, 1)
        workflow.refresh_from_db()
        assert (workflow.n_completed, workflow.n_ready, workflow.n_pending, workflow.n_in_progress) == (1, 2, 0, 0)
        assert (workflow.spent_usd, workflow.spent_tokens) == (Decimal("0.25"), 10)
        events = list(Event.objects.filter(workflow=workflow).order_by("seq").values_list("seq", "kind", "data"))
        assert [kind for _, kind, _ in events][-2:] == ["step.completed", "steps.released"]
        assert len({seq for seq, _, _ in events}) == len(events)
        assert events[-2][2] == {"step": "A", "agent": "dev-1", "attempt": 1, "status": "completed"}
        assert events[-1][2] == {"steps": ["B"], "by": "A"}

    def test_it_releases_the_steps_locks_with_their_event_after_the_steps_own(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("A", files=(("src/a.py", "write"), ("spec.md", "read"))), step("B", "A")))
        step_id, token = pull(developer)
        fencing = dict(FileLock.objects.filter(step_id=step_id).values_list("path", "fencing"))
        assert report(developer, step_id, token).status_code == 200
        assert not FileLock.objects.filter(step_id=step_id, released_at__isnull=True).exists()
        assert set(FileLock.objects.filter(step_id=step_id).values_list("release_reason", flat=True)) == {"completed"}
        kinds = list(Event.objects.filter(workflow=workflow).order_by("seq").values_list("kind", "data"))
        assert [kind for kind, _ in kinds][-3:] == ["step.completed", "steps.released", "locks.released"]
        assert kinds[-1][1] == {"reason": "completed", "locks": [
            {"path": "spec.md", "mode": "read", "fencing": fencing["spec.md"]},
            {"path": "src/a.py", "mode": "write", "fencing": fencing["src/a.py"]}]}
        # Another agent can take the write lock at once.
        assert acquire(developer, ["src/a.py"])

    def test_a_report_after_the_lease_ran_out_writes_nothing_but_its_refusal(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A")))
        step_id, token = pull(developer)
        Step.objects.filter(id=step_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        events = Event.objects.filter(workflow=workflow).count()
        response = report(developer, step_id, token, usage={"model": "m", "prompt_tokens": 5, "completion_tokens": 5})
        assert response.status_code == 409 and response.json()["error"] == "stale_lease"
        assert Step.objects.get(id=step_id).status == "in_progress"
        assert not Result.objects.exists() and not AgentUsage.objects.filter(agent=developer.agent).exists()
        assert list(Event.objects.filter(workflow=workflow).values_list("kind", flat=True)[events:]) == [
            "step.stale_report"]
        workflow.refresh_from_db()
        assert (workflow.n_in_progress, workflow.n_completed, workflow.spent_tokens) == (1, 0, 0)

    def test_it_pauses_a_workflow_its_spend_takes_over_budget(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B"),
                                                                        budget_usd=Decimal("0.10")))
        step_id, token = pull(developer)
        answer = report(developer, step_id, token,
                        usage={"model": "m", "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.5}).json()
        assert answer["workflow_status"] == "paused"
        workflow.refresh_from_db()
        assert workflow.status == "paused" and workflow.paused_reason.startswith("budget: spent $0.5000")
        assert Event.objects.filter(workflow=workflow, kind="workflow.paused").count() == 1

    def test_a_workflow_left_unsettled_by_a_dead_reporter_is_settled_by_the_sweep(self, developer, monkeypatch,
                                                                                 step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, token = pull(developer)
        # The database refuses to settle the workflow right after the report (as if the reporting process died
        # in between): the report stands and says so, and the sweep settles the workflow.
        def busy(**kwargs):
            raise Busy("The server was busy (a deadlock with another transaction, 4 times).", retryable=True)

        monkeypatch.setattr(reports.workflow_control, "workflow_settle", busy)
        response = report(developer, step_id, token)
        assert response.status_code == 200 and response.json()["workflow_status"] == "completed"
        workflow.refresh_from_db()
        assert workflow.status == "running" and workflow.n_completed == 1
        monkeypatch.undo()
        assert tasks.sweep_expired()["workflows"] == 1
        workflow.refresh_from_db()
        assert (workflow.status, workflow.audit_status) == ("completed", "pending")
        assert Event.objects.filter(workflow=workflow, kind="workflow.completed").count() == 1
        assert tasks.sweep_expired()["workflows"] == 0

    def test_the_sweep_leaves_a_workflow_resumed_over_its_budget_running(self, developer, owner, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B"),
                                                                        budget_usd=Decimal("0.10")))
        step_id, token = pull(developer)
        report(developer, step_id, token, usage={"model": "m", "prompt_tokens": 1, "completion_tokens": 1,
                                                 "cost_usd": 0.5})
        workflow_control.workflow_resume(workflow_id=workflow.id, user=owner)
        assert tasks.sweep_expired()["workflows"] == 0
        workflow.refresh_from_db()
        assert workflow.status == "running"


class RetryAfterSkipTests:
    def test_a_step_skipped_while_its_other_dependency_completed_runs_once_its_failed_one_is_retried(
            self, developer, step, workflow_spec):
        """A and X -> D. X fails for good (D skipped), then A completes (no count-down for a skipped D), then X is
        retried and completes: D must become ready, not wait for ever on A's count."""
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("X", max_attempts=1, priority=5), step("A"), step("D", "A", "X")))
        x_id, x_token = pull(developer)
        assert report(developer, x_id, x_token, status="failed", error="no", retryable=False).status_code == 200
        assert Step.objects.get(workflow=workflow, key="D").status == "skipped"
        a_id, a_token = pull(developer)
        assert report(developer, a_id, a_token).status_code == 200
        workflow_control.step_retry(step_id=x_id)
        d = Step.objects.get(workflow=workflow, key="D")
        assert (d.status, d.remaining_deps) == ("pending", 1)
        x_id, x_token = pull(developer)
        assert report(developer, x_id, x_token).json()["released"] == ["D"]
        assert Step.objects.get(workflow=workflow, key="D").status == "ready"
