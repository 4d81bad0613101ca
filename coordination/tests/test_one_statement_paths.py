"""The pull and the report done in one statement each, and what keeps them exact under concurrency: the
agent's `pull_seq` (a pull that committed meanwhile is noticed) and the lock order of the step rows."""

import threading
import time

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from coordination.errors import AtCapacity
from coordination.models import Event, Step, StepStatus, Workflow
from coordination.services import lock_order, pull, workflow_creation
from coordination.services.lock_order import Along

pytestmark = pytest.mark.django_db(transaction=True)


def _wait_until_a_backend_waits_on_a_lock(cursor, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock'")
        if cursor.fetchone()[0]:
            return
        time.sleep(0.01)
    raise AssertionError("no backend came to wait on a lock")


def _in_thread(target) -> tuple[threading.Thread, list]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            connections["default"].close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


class OneStatementPullTests:
    def test_a_pull_is_one_statement_and_a_batch_numbers_each_workflows_events(self, developer, step,
                                                                                workflow_spec):
        first = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B"), name="one"))
        second = workflow_creation.workflow_create(spec=workflow_spec(step("C"), step("D"), name="two"))
        with CaptureQueriesContext(connection) as queries:
            leases = pull.steps_pull(agent=developer.agent, roles=["developer"], count=2)
        assert len(queries) == 1, [query["sql"][:80] for query in queries]
        assert len(leases) == 2 and len({lease.step.id for lease in leases}) == 2
        for lease in leases:
            stored = Step.objects.get(id=lease.step.id)
            assert (stored.status, stored.lease_agent_id, stored.lease_attempt_id, stored.attempt) == (
                StepStatus.IN_PROGRESS, developer.agent.id, lease.attempt.id, 1)
            assert stored.lease_token_hash == lease.attempt.lease_token_hash
        for workflow in (first, second):
            workflow.refresh_from_db()
            seqs = list(Event.objects.filter(workflow=workflow).order_by("seq").values_list("seq", flat=True))
            assert seqs == list(range(1, workflow.event_seq + 1))
        counts = [(w.n_ready, w.n_in_progress) for w in Workflow.objects.order_by("name")]
        leased_per_workflow = [sum(1 for lease in leases if lease.step.workflow_id == w.id) for w in (first, second)]
        assert counts == [(2 - n, n) for n in leased_per_workflow]
        leased = Event.objects.get(step_id=leases[0].step.id, kind="step.leased")
        assert leased.data["expires_at"] == leases[0].expires_at.isoformat().replace("+00:00", "Z")

    def test_a_pull_that_commits_meanwhile_is_counted_against_the_capacity(self, make_agent, step, workflow_spec):
        agent = make_agent("solo", ["developer"], capacity=1).agent
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        granted = threading.Event()

        def other_pull_of_the_same_agent() -> None:
            with transaction.atomic():
                leases = pull._steps_pull_locked(agent=agent, roles=["developer"], count=1, idempotency_key="")
                assert len(leases) == 1
                granted.set()
                with connection.cursor() as cursor:
                    _wait_until_a_backend_waits_on_a_lock(cursor)

        thread, errors = _in_thread(other_pull_of_the_same_agent)
        assert granted.wait(10)
        # This pull's snapshot predates the other's commit; it waits for the agent's row, then must see that
        # the agent holds its one step.
        with pytest.raises(AtCapacity):
            pull.steps_pull(agent=agent, roles=["developer"], count=1)
        thread.join(10)
        assert not errors, errors
        assert Step.objects.filter(lease_agent=agent, status=StepStatus.IN_PROGRESS).count() == 1


class StepLockOrderTests:
    def test_locking_a_step_with_its_dependents_locks_every_one_of_them_at_once(self, developer, step,
                                                                                 workflow_spec):
        workflow = workflow_creation.workflow_create(
            spec=workflow_spec(step("A"), *(step(f"B{i}", "A") for i in range(6))))
        a = Step.objects.get(workflow=workflow, key="A")
        ids = [str(step_id) for step_id in Step.objects.filter(workflow=workflow).values_list("id", flat=True)]
        free: list[list] = []

        def try_the_rows() -> None:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SELECT id FROM coordination_step WHERE id = ANY(%s::uuid[]) FOR UPDATE SKIP LOCKED",
                               [ids])
                free.append(cursor.fetchall())

        with transaction.atomic():
            lock_order.locked_step(a.id, along=Along.DEPENDENTS)
            thread, errors = _in_thread(try_the_rows)
            thread.join(10)
        assert not errors, errors
        assert free == [[]]
