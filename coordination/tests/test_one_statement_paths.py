"""The pull and the report done in one statement each, and what keeps them exact under concurrency: the
agent's `pull_seq` (a pull that committed meanwhile is noticed) and the lock order of the step rows."""

import threading

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext

from coordination.errors import AtCapacity, LockConflict
from coordination.models import Event, FileLock, Step, StepStatus, Workflow
from coordination.services import file_locks, lock_order, pull, workflow_creation
from coordination.services.lock_order import Along
from coordination.tests.lock_waits import wait_until_a_backend_waits_on_a_lock

pytestmark = pytest.mark.django_db(transaction=True)


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

def _grant_held_until_someone_waits(*, agent, project_name, paths, step_id=None, lease_token=None):
    """In a thread: grant write locks on `paths` in a transaction and keep it open until another backend waits
    on a lock (the test's own request, queued behind it); returns once the grant is made."""
    granted = threading.Event()

    def grant() -> None:
        with transaction.atomic():
            attempt = file_locks._locks_try(agent=agent, project_name=project_name, paths=paths, mode="write",
                                            step_id=step_id, lease_token=lease_token, ttl_s=60, waiter_id=None)
            assert attempt.granted
            granted.set()
            with connection.cursor() as cursor:
                wait_until_a_backend_waits_on_a_lock(cursor)

    thread, errors = _in_thread(grant)
    assert granted.wait(10), errors
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
            kinds = list(Event.objects.filter(workflow=workflow).order_by("seq").values_list("kind", flat=True))
            assert kinds[0] == "workflow.created" and set(kinds[1:]) <= {"step.leased"}
        # One statement's events are numbered in best-first order (the order of the leases).
        leased = Event.objects.filter(kind="step.leased", step_id__in=[lease.step.id for lease in leases])
        assert [e.step_id for e in leased.order_by("seq")] == [lease.step.id for lease in leases]
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
                    wait_until_a_backend_waits_on_a_lock(cursor)

        thread, errors = _in_thread(other_pull_of_the_same_agent)
        assert granted.wait(10)
        # This pull's snapshot predates the other's commit; it waits for the agent's row, then must see that
        # the agent holds its one step.
        with pytest.raises(AtCapacity):
            pull.steps_pull(agent=agent, roles=["developer"], count=1)
        thread.join(10)
        assert not errors, errors
        assert Step.objects.filter(lease_agent=agent, status=StepStatus.IN_PROGRESS).count() == 1


class OneStatementLockTests:
    def test_an_uncontended_acquire_is_the_projects_lock_and_one_statement(self, developer, other_developer):
        for path in ("warm.md", "warm-2.md"):  # the project exists, and this process knows its id
            file_locks.locks_acquire(agent=developer.agent, paths=[path], mode="write")
        with CaptureQueriesContext(connection) as queries:
            locks = file_locks.locks_acquire(agent=developer.agent, paths=["src/", "b.md"], mode="read", ttl_s=90)
        # Sent together: the project's lock, then the decision and grant.
        assert len(queries) == 2, [query["sql"][:80] for query in queries]
        assert "pg_advisory_xact_lock" in queries[0]["sql"] and "INSERT INTO coordination_filelock" in queries[1]["sql"]
        assert [(lock.path, lock.mode) for lock in locks] == [("b.md", "read"), ("src/", "read")]
        stored = {lock.path: lock for lock in FileLock.objects.filter(agent=developer.agent, released_at=None)}
        assert {lock.path: lock.fencing for lock in locks} == {path: stored[path].fencing for path in ("b.md", "src/")}
        assert all((lock.expires_at - lock.acquired_at).total_seconds() == 90 for lock in locks)
        event = Event.objects.filter(kind="locks.granted").latest("id")
        assert event.data == {"project": "default", "agent": "dev-1", "locks": [
            {"path": "b.md", "mode": "read", "fencing": stored["b.md"].fencing},
            {"path": "src/", "mode": "read", "fencing": stored["src/"].fencing}]}
        # Its own locks never block it; another holder's conflicting one does (the transaction path says which).
        assert file_locks.locks_acquire(agent=developer.agent, paths=["src/a.py"], mode="write")
        with pytest.raises(LockConflict, match="b.md is held"):
            file_locks.locks_acquire(agent=other_developer.agent, paths=["b.md"], mode="write")

    def test_a_grant_that_commits_meanwhile_is_seen_before_granting(self, developer, other_developer):
        file_locks.locks_acquire(agent=developer.agent, paths=["warm.md"], mode="write")
        thread, errors = _grant_held_until_someone_waits(agent=other_developer.agent, project_name="default",
                                                         paths=["src/"])
        # This request waits for the project's lock while the other grant commits, and must then see that
        # `src/` is held.
        with pytest.raises(LockConflict):
            file_locks.locks_acquire(agent=developer.agent, paths=["src/app.py"], mode="write")
        thread.join(10)
        assert not errors, errors
        assert list(FileLock.objects.filter(released_at=None, path__startswith="src").values_list("path", flat=True)) \
            == ["src/"]


class OneStatementReportRaceTests:
    def test_a_lock_taken_under_the_step_while_its_report_waits_is_released_with_it(self, developer, step,
                                                                                     workflow_spec):
        from coordination.services import reports
        from coordination.tests.agent_calls import pull as api_pull

        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A")))
        step_id, token = api_pull(developer)
        thread, errors = _grant_held_until_someone_waits(agent=developer.agent, project_name=None,
                                                         paths=["src/a.py"], step_id=step_id, lease_token=token)
        # The report waits for the step's row while the lock commits; it must see the lock and release it.
        answer = reports.step_report(step_id=step_id, agent=developer.agent, lease_token=token,
                                     outcome=reports.Outcome(status="completed"))
        thread.join(10)
        assert not errors, errors
        assert answer["released"] == ["B"]
        lock = FileLock.objects.get(path="src/a.py")
        assert (lock.released_at is not None, lock.release_reason) == (True, "completed")
        assert Event.objects.filter(kind="locks.released", step_id=step_id).count() == 1

    def test_a_lock_taken_under_the_step_while_its_heartbeat_waits_follows_the_lease(self, developer, step,
                                                                                      workflow_spec, monkeypatch):
        from coordination.services import leases
        from coordination.tests.agent_calls import pull as api_pull

        workflow_creation.workflow_create(spec=workflow_spec(step("A", lease_ttl_s=60)))
        step_id, token = api_pull(developer)
        published = []
        monkeypatch.setattr(leases, "inserted_event_published", published.append)
        thread, errors = _grant_held_until_someone_waits(agent=developer.agent, project_name=None,
                                                         paths=["src/a.py"], step_id=step_id, lease_token=token)
        # The heartbeat waits for the step's row while the lock commits; it must see the lock and renew it.
        answer = leases.step_heartbeat(step_id=step_id, agent=developer.agent, lease_token=token,
                                       iterations=[leases.IterationIn(index=1, action="write_file")])
        thread.join(10)
        assert not errors, errors
        assert answer["cancel"] is False
        assert FileLock.objects.get(path="src/a.py").expires_at == answer["expires_at"] \
            == Step.objects.get(id=step_id).lease_expires_at
        # Out of any transaction (the common case on a server): committed, and its event handed over to publish.
        stored = Event.objects.get(kind="step.progress", step_id=step_id)
        assert [(e.id, e.seq, e.data["iterations"]) for e in published] == [(stored.id, stored.seq, [1])]


class RunAfterLockTests:
    def test_a_failing_statement_rolls_the_pair_back_and_leaves_the_connection_usable(self):
        from django.db import DataError

        with pytest.raises(DataError):
            lock_order.run_after_lock("SELECT pg_advisory_xact_lock(%(key)s)", {"key": 4242},
                                      "SELECT 1 / %(zero)s AS x", {"zero": 0})
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
        taken: list = []

        def try_the_lock() -> None:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(4242)")
                taken.append(cursor.fetchone()[0])
                cursor.execute("SELECT pg_advisory_unlock(4242)")

        thread, errors = _in_thread(try_the_lock)
        thread.join(10)
        assert not errors and taken == [True]  # the failed pair's lock went with its transaction
        assert lock_order.run_after_lock("SELECT pg_advisory_xact_lock(%(key)s)", {"key": 4242},
                                         "SELECT 2 AS x", {}) == [{"x": 2}]


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
