"""Every way an attempt ends makes its span, under its workflow's root; the lease names that span.

(The whole tree of one worked step, worker spans included, is in agents/tests/test_tracing.py.)
"""

from uuid import UUID

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from am_project import telemetry
from coordination.models import Attempt, AttemptOutcome
from coordination.services import workflow_control, workflow_creation
from coordination.tests.agent_calls import expire, report

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    telemetry.configure({}, exporter=exporter, install_global=False)
    yield exporter
    telemetry.unconfigure()


def _pull(agent):
    body = agent.client().get("/v1/tasks/developer/ready").json()
    return body["step"]["id"], body["lease"]["token"], body["lease"]["traceparent"]


def _attempt_spans(spans):
    return [s for s in spans.get_finished_spans() if s.name.startswith("attempt ")]


class AttemptSpanTests:
    def test_the_lease_names_the_span_its_attempt_will_have(self, spans, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, token, traceparent = _pull(developer)
        assert report(developer, step_id, token, final_result="ok").status_code == 200
        [span] = _attempt_spans(spans)
        assert traceparent == f"00-{workflow.id.hex}-{span.context.span_id:016x}-01"

    def test_an_expired_lease_ends_its_attempt_span_failed(self, spans, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", max_attempts=2)))
        step_id, _, _ = _pull(developer)
        assert expire(step_id) == 1
        [span] = _attempt_spans(spans)
        assert span.attributes["am.outcome"] == AttemptOutcome.EXPIRED
        assert span.status.status_code == StatusCode.ERROR
        assert span.context.trace_id == workflow.id.int
        assert not [s for s in spans.get_finished_spans() if s.name == "workflow"]  # still running

    def test_a_hand_back_and_a_failure_each_end_their_attempt(self, spans, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A", max_attempts=3)))
        step_id, token, _ = _pull(developer)
        assert developer.client().post(f"/v1/steps/{step_id}/release", {"lease_token": token},
                                       format="json").status_code == 200
        step_id, token, _ = _pull(developer)
        assert report(developer, step_id, token, status="failed", error="tool broke",
                      retryable=False).status_code == 200
        released, failed = sorted(_attempt_spans(spans), key=lambda s: s.attributes["am.attempt"])
        assert released.attributes["am.outcome"] == AttemptOutcome.RELEASED
        assert released.status.status_code == StatusCode.UNSET
        assert failed.attributes["am.outcome"] == AttemptOutcome.FAILED
        assert failed.status.status_code == StatusCode.ERROR and failed.status.description == "tool broke"
        [root] = [s for s in spans.get_finished_spans() if s.name == "workflow"]
        assert root.attributes["am.workflow.status"] == "failed"
        assert released.parent.span_id == failed.parent.span_id == root.context.span_id

    def test_a_cancel_ends_the_running_attempts_and_the_workflow_once(self, spans, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        _pull(developer)
        _pull(developer)
        workflow_control.workflow_cancel(workflow_id=workflow.id)
        cancelled = _attempt_spans(spans)
        assert sorted(s.attributes["am.step.key"] for s in cancelled) == ["A", "B"]
        assert {s.attributes["am.outcome"] for s in cancelled} == {AttemptOutcome.CANCELLED}
        assert {s.attributes["am.agent.name"] for s in cancelled} == {"dev-1"}
        ended = {a.id: a.ended_at for a in Attempt.objects.filter(step__workflow=workflow)}
        for span in cancelled:
            assert span.end_time == int(ended[UUID(span.attributes["am.attempt.id"])].timestamp() * 1e6) * 1000
        assert len([s for s in spans.get_finished_spans() if s.name == "workflow"]) == 1


class SettleCountPlanTests:
    def test_the_first_settle_check_reads_the_settles_of_the_workflow_not_its_events(self, step, workflow_spec):
        """With tracing on, every settle asks whether it is the workflow's first: the answer must cost the same
        whatever the length of the workflow's event log (the partial index `event_workflow_settled`)."""
        from django.db import connection

        from coordination import tracing
        from coordination.models import Event

        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        Event.objects.bulk_create([Event(workflow=workflow, seq=1000 + i, kind="step.progress") for i in range(5000)])
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE coordination_event")
            cursor.execute("EXPLAIN " + tracing.SETTLES_SQL, {"workflow": workflow.id})
            plan = "\n".join(row[0] for row in cursor.fetchall())
            cursor.execute(tracing.SETTLES_SQL, {"workflow": workflow.id})
            assert cursor.fetchone()[0] == 0
        assert "event_workflow_settled" in plan and "Seq Scan" not in plan, plan
