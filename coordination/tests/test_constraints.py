"""The database itself refuses states the code must never produce."""

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from coordination.services import workflow_creation
from coordination.models import Attempt, Step, StepDependency, StepStatus, Workflow

pytestmark = pytest.mark.django_db


@pytest.fixture
def workflow(step, workflow_spec) -> Workflow:
    return workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A")))


def _refused(fn) -> None:
    with pytest.raises(IntegrityError):
        with transaction.atomic():
            fn()


class ConstraintTests:
    def test_it_refuses_a_duplicate_key_in_a_workflow(self, workflow):
        _refused(lambda: Step.objects.create(workflow=workflow, key="A", name="again", role="developer"))

    def test_it_allows_the_same_key_in_another_workflow(self, workflow, step, workflow_spec):
        other = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        assert Step.objects.filter(key="A").count() == 2
        assert other.id != workflow.id

    def test_it_refuses_an_in_progress_step_without_a_lease(self, workflow):
        _refused(lambda: Step.objects.filter(workflow=workflow, key="A").update(status=StepStatus.IN_PROGRESS))

    def test_it_refuses_a_ready_step_with_open_dependencies(self, workflow):
        _refused(lambda: Step.objects.filter(workflow=workflow, key="B").update(status=StepStatus.READY))

    def test_it_refuses_an_unknown_status(self, workflow):
        _refused(lambda: Step.objects.filter(workflow=workflow, key="A").update(status="done"))

    def test_it_refuses_a_bad_role(self, workflow):
        _refused(lambda: Step.objects.filter(workflow=workflow, key="A").update(role="Not A Slug"))

    def test_it_refuses_counters_that_do_not_add_up(self, workflow):
        _refused(lambda: Workflow.objects.filter(id=workflow.id).update(n_ready=5))

    def test_it_refuses_a_self_dependency(self, workflow):
        a = Step.objects.get(workflow=workflow, key="A")
        _refused(lambda: StepDependency.objects.create(workflow=workflow, step=a, depends_on=a))

    def test_it_refuses_a_second_open_attempt(self, workflow):
        a = Step.objects.get(workflow=workflow, key="A")
        expires = timezone.now()
        Attempt.objects.create(step=a, number=1, lease_token_hash="x" * 64, expires_at=expires)
        _refused(lambda: Attempt.objects.create(step=a, number=2, lease_token_hash="y" * 64, expires_at=expires))


class HotTableIndexTests:
    def test_the_tables_every_pull_and_report_write_carry_exactly_these_indexes(self):
        """Each index is written on every change of a row: none is redundant, and none of the unique ones went
        missing (Django's AlterField of a foreign key once dropped `attempt_one_open` with the key's own index)."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT tablename, indexname FROM pg_indexes WHERE tablename = ANY(%s)",
                           [["coordination_step", "coordination_attempt", "coordination_event",
                             "coordination_iteration"]])
            found = {(table.removeprefix("coordination_"), name) for table, name in cursor.fetchall()}
        assert found == {
            ("step", "coordination_step_pkey"), ("step", "step_key_unique_in_workflow"),
            ("step", "step_ready_queue"), ("step", "step_lease_expiry"), ("step", "step_leased_by"),
            ("step", "step_workflow_status"), ("step", "step_lease_agent"), ("step", "step_lease_attempt"),
            ("attempt", "coordination_attempt_pkey"), ("attempt", "attempt_number_unique"),
            ("attempt", "attempt_one_open"), ("attempt", "attempt_idempotency"),
            ("attempt", "coordination_attempt_agent_id_11cabf07"),
            ("event", "coordination_event_pkey"), ("event", "event_seq_unique_per_workflow"),
            ("event", "event_recent"), ("event", "event_workflow_settled"),
            ("event", "coordination_event_step_id_d82d0d60"),
            ("event", "coordination_event_agent_id_2548c260"),
            ("iteration", "coordination_iteration_pkey"), ("iteration", "iteration_unique"),
        }
