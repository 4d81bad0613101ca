import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from coordination.services import workflow_creation, workflow_specs
from coordination.errors import InvalidWorkflow
from coordination.models import Event, Step, StepDependency, StepStatus, Workflow, WorkflowStatus

pytestmark = pytest.mark.django_db


def _rejection(spec) -> InvalidWorkflow:
    before = (Workflow.objects.count(), Step.objects.count(), StepDependency.objects.count(), Event.objects.count())
    with pytest.raises(InvalidWorkflow) as info:
        workflow_creation.workflow_create(spec=spec)
    after = (Workflow.objects.count(), Step.objects.count(), StepDependency.objects.count(), Event.objects.count())
    assert after == before, "a rejected workflow must store nothing"
    return info.value


def _codes(error: InvalidWorkflow) -> list[str]:
    return [problem["code"] for problem in error.errors]


class WorkflowValidationTests:
    def test_it_rejects_an_empty_graph(self, workflow_spec):
        error = _rejection(workflow_spec())
        assert _codes(error) == ["empty_graph"]
        assert error.code == "invalid_workflow"

    def test_it_names_a_duplicate_key(self, step, workflow_spec):
        error = _rejection(workflow_spec(step("A"), step("B"), step("A")))
        assert _codes(error) == ["duplicate_key"]
        assert error.errors[0]["step"] == "A"
        assert "'A'" in error.errors[0]["detail"]

    def test_it_names_an_unknown_dependency(self, step, workflow_spec):
        error = _rejection(workflow_spec(step("A"), step("B", "ghost")))
        assert _codes(error) == ["unknown_dependency"]
        assert error.errors[0]["step"] == "B"
        assert error.errors[0]["depends_on"] == "ghost"

    def test_it_names_a_self_dependency(self, step, workflow_spec):
        error = _rejection(workflow_spec(step("A"), step("B", "B")))
        assert _codes(error) == ["self_dependency"]
        assert error.errors[0]["step"] == "B"

    def test_it_names_a_cycle_in_order(self, step, workflow_spec):
        # A runs after C, B after A, C after B: the cycle is A -> B -> C -> A.
        error = _rejection(workflow_spec(step("root"), step("A", "C", "root"), step("B", "A"), step("C", "B")))
        assert _codes(error) == ["cycle"]
        assert error.errors[0]["cycle"] == ["A", "B", "C", "A"]
        assert "A -> B -> C -> A" in error.errors[0]["detail"]

    def test_it_finds_a_cycle_behind_a_long_chain(self, step, workflow_spec):
        steps = [step("s0", "s2999")] + [step(f"s{i}", f"s{i - 1}") for i in range(1, 3000)]
        error = _rejection(workflow_spec(*steps))
        cycle = error.errors[0]["cycle"]
        assert cycle[0] == "s0" and cycle[-1] == "s0" and len(cycle) == 3001

    def test_it_names_a_bad_role(self, step, workflow_spec):
        error = _rejection(workflow_spec(step("A", role="Bad Role!")))
        assert _codes(error) == ["bad_role"]
        assert "'Bad Role!'" in error.errors[0]["detail"]

    def test_it_names_a_bad_key(self, step, workflow_spec):
        error = _rejection(workflow_spec(step("has space")))
        assert _codes(error) == ["bad_key"]

    def test_it_rejects_more_steps_than_the_limit(self, settings, chain):
        settings.AM_MAX_STEPS_PER_WORKFLOW = 5
        error = _rejection(chain(6))
        assert _codes(error) == ["too_many_steps"]
        assert "AM_MAX_STEPS_PER_WORKFLOW" in error.errors[0]["detail"]

    def test_it_rejects_a_declared_file_outside_the_workspace(self, step, workflow_spec):
        error = _rejection(workflow_spec(step("A", files=(("../etc/passwd", "write"),))))
        assert _codes(error) == ["bad_file"]

    def test_it_reports_every_problem_at_once(self, step, workflow_spec):
        error = _rejection(workflow_spec(step("A", role="BAD"), step("A"), step("C", "nope")))
        assert sorted(_codes(error)) == ["bad_role", "duplicate_key", "unknown_dependency"]


class WorkflowCreateTests:
    def test_it_stores_roots_ready_and_the_rest_pending(self, step, workflow_spec):
        workflow = workflow_creation.workflow_create(
            spec=workflow_spec(step("A"), step("B"), step("C", "A", "B"), step("D", "C"))
        )
        statuses = dict(Step.objects.filter(workflow=workflow).values_list("key", "status"))
        assert statuses == {"A": "ready", "B": "ready", "C": "pending", "D": "pending"}
        remaining = dict(Step.objects.filter(workflow=workflow).values_list("key", "remaining_deps"))
        assert remaining == {"A": 0, "B": 0, "C": 2, "D": 1}
        workflow.refresh_from_db()
        assert workflow.status == WorkflowStatus.RUNNING
        assert (workflow.total_steps, workflow.n_ready, workflow.n_pending) == (4, 2, 2)
        assert StepDependency.objects.filter(workflow=workflow).count() == 3

    def test_it_records_a_created_event(self, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        event = Event.objects.get(workflow=workflow)
        assert event.kind == "workflow.created" and event.seq > 0
        assert event.data["ready"] == ["A"]

    def test_it_normalises_declared_files(self, step, workflow_spec):
        workflow = workflow_creation.workflow_create(
            spec=workflow_spec(step("A", files=(("src/./app.py", "read"), ("src//app.py", "write"), ("docs/", "read"))))
        )
        files = Step.objects.get(workflow=workflow).files
        assert files == [{"path": "src/app.py", "mode": "write"}, {"path": "docs/", "mode": "read"}]

    def test_it_creates_an_unknown_project(self, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), project="team-blue"))
        assert workflow.project.name == "team-blue"

    def test_it_stores_a_goal_without_steps_as_planning(self):
        workflow = workflow_creation.workflow_create(spec=workflow_specs.WorkflowSpec(name="Plan me", goal="Write a report"))
        assert workflow.status == WorkflowStatus.PLANNING
        assert workflow.total_steps == 0

    def test_it_accepts_1000_steps_in_one_transaction_with_few_queries(self, step, workflow_spec):
        spec = workflow_spec(*[step(f"s{i}", *([f"s{i // 2}"] if i else [])) for i in range(1000)])
        with CaptureQueriesContext(connection) as queries:
            workflow = workflow_creation.workflow_create(spec=spec)
        # Bulk inserts: the query count does not grow with the number of steps.
        assert len(queries) < 20
        assert sum(1 for q in queries if q["sql"].startswith("SAVEPOINT")) <= 2
        workflow.refresh_from_db()
        assert workflow.total_steps == 1000
        assert Step.objects.filter(workflow=workflow, status=StepStatus.READY).count() == 1
        assert StepDependency.objects.filter(workflow=workflow).count() == 999
