"""The workflow row is not a queue: the hot paths move its counters by deltas and number their events without it.

A pull and a completed report insert a `WorkflowDelta` and events numbered by their
transaction; the row is never locked by them. Whatever reads a workflow through the
ORM sees the row plus its deltas; folding moves them into the row without changing
what anyone reads. The event log is read below the oldest transaction still running,
so a reader that goes on from the last `seq` it saw misses nothing.
"""

import re
import threading
from collections import Counter

import psycopg
import pytest
from django.db import DataError, OperationalError, connection, transaction

from coordination import models, selectors
from coordination.models import LIVE_FIELDS, Event, Step, StepStatus, Workflow, WorkflowDelta
from coordination.services import event_log, workflow_counters, workflow_creation
from coordination.tests.agent_calls import pull, report
from coordination.tests.lock_waits import wait_until_a_backend_waits_on_a_lock

ROW = ["n_pending", "n_ready", "n_in_progress", "n_completed", "spent_usd", "spent_tokens"]


def _row(workflow_id) -> tuple:
    """The workflow row's own columns, without its deltas (`values_list` reads the table only)."""
    return tuple(Workflow.objects.values_list(*ROW).get(id=workflow_id))


def _live(workflow_id) -> tuple:
    workflow = Workflow.objects.get(id=workflow_id)
    return tuple(getattr(workflow, field) for field in ROW)


def _other_connection() -> psycopg.Connection:
    """A second connection to the test database, for a transaction that runs beside the test's."""
    params = connection.get_connection_params()
    return psycopg.connect(**{k: v for k, v in params.items() if k != "cursor_factory"})


def _steps(workflow_id) -> Counter:
    return Counter(Step.objects.filter(workflow_id=workflow_id).values_list("status", flat=True))


@pytest.mark.django_db
class DeltaTests:
    def test_the_hot_paths_leave_the_row_alone_and_every_read_adds_their_deltas(
            self, developer, owner_client, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), step("C", "A")))
        before = _row(workflow.id)
        step_id, token = pull(developer)
        assert report(developer, step_id, token, usage={"model": "m", "prompt_tokens": 3, "completion_tokens": 4,
                                                        "cost_usd": 0.5}).status_code == 200
        assert _row(workflow.id) == before  # the row itself did not move
        assert WorkflowDelta.objects.filter(workflow=workflow).count() == 2  # the pull's and the report's
        live = Workflow.objects.get(id=workflow.id)
        assert (live.n_pending, live.n_ready, live.n_in_progress, live.n_completed) == (0, 2, 0, 1)
        assert (float(live.spent_usd), live.spent_tokens) == (0.5, 7) and type(live.spent_tokens) is int
        assert live.counts == {status: _steps(workflow.id)[status] for status in live.counts}
        status = owner_client.get(f"/v1/workflows/{workflow.id}/status").json()
        assert status["counts"] == live.counts and status["progress"] == round(1 / 3, 4)
        detail = owner_client.get(f"/v1/workflows/{workflow.id}").json()
        assert detail["spent"] == {"usd": 0.5, "tokens": 7} and type(detail["spent"]["tokens"]) is int
        # Related access and refresh_from_db read live too.
        assert Step.objects.get(id=step_id).workflow.n_completed == 1
        workflow.refresh_from_db()
        assert workflow.n_completed == 1
        # Folding moves the deltas into the row; what anyone reads does not change.
        assert workflow_counters.workflow_fold([workflow.id]) == 1
        assert not WorkflowDelta.objects.filter(workflow=workflow).exists()
        assert _row(workflow.id) == _live(workflow.id) == (0, 2, 0, 1, live.spent_usd, 7)

    def test_a_change_on_the_row_folds_the_deltas_in_with_its_own(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", max_attempts=1), step("B", "A")))
        step_id, token = pull(developer)  # a delta: ready -1, in progress +1
        # A failure moves the row itself (under its lock): the pull's delta goes in with it, or the row's own
        # in-progress count would go below zero (its check constraint).
        assert report(developer, step_id, token, status="failed", error="no").status_code == 200
        assert not WorkflowDelta.objects.filter(workflow=workflow).exists()
        assert _row(workflow.id)[:4] == (0, 0, 0, 0)
        workflow = Workflow.objects.get(id=workflow.id)
        assert (workflow.status, workflow.n_failed, workflow.n_skipped) == ("failed", 1, 1)

    def test_saving_an_instance_never_writes_its_counters(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        pull(developer)
        live = Workflow.objects.get(id=workflow.id)
        assert live.n_in_progress == 1
        live.name = "renamed"
        live.save()  # all fields but the counters: writing the live values into the row would count them twice
        assert Workflow.objects.values_list("name", "n_in_progress").get(id=workflow.id) == ("renamed", 0)
        assert _live(workflow.id)[2] == 1
        with pytest.raises(ValueError, match="n_ready"):
            live.save(update_fields=["n_ready"])

    def test_a_report_folds_its_workflows_deltas_now_and_then(self, developer, step, workflow_spec, monkeypatch):
        from coordination.services import reports

        monkeypatch.setattr(reports, "FOLD_SHARE", 1)  # every time
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        step_id, token = pull(developer)
        assert report(developer, step_id, token).status_code == 200
        assert not WorkflowDelta.objects.filter(workflow=workflow).exists()
        assert _row(workflow.id)[:4] == (0, 1, 0, 1)

    def test_the_sweep_folds_every_workflow_with_deltas(self, developer, step, workflow_spec):
        first = workflow_creation.workflow_create(spec=workflow_spec(step("A"), name="one"))
        second = workflow_creation.workflow_create(spec=workflow_spec(step("B"), name="two"))
        pull(developer)
        pull(developer)  # capacity 2: one from each; a pull settles nothing
        assert WorkflowDelta.objects.values("workflow").distinct().count() == 2
        live = [_live(first.id), _live(second.id)]
        # One workflow a statement, at most one statement: under a steady load the sweep stops, the next goes on.
        assert workflow_counters.workflows_fold_sweep(limit=1, rounds=1) == 1
        assert WorkflowDelta.objects.values("workflow").distinct().count() == 1
        assert workflow_counters.workflows_fold_sweep(limit=1) == 1
        assert not WorkflowDelta.objects.exists()
        assert [_row(first.id), _row(second.id)] == live

    def test_only_the_fields_read_get_their_deltas(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        pull(developer)
        only = Workflow.objects.only("id", "n_ready").get(id=workflow.id)
        assert only.n_ready == 0
        assert only.n_in_progress == 1  # deferred, then loaded live

    def test_the_live_figures_are_read_in_the_order_of_the_live_fields(self):
        assert tuple(re.findall(r"w\.(\w+) \+ coalesce\(sum\(d\.(\w+)\)", models._LIVE_SQL)) == tuple(
            (field, field) for field in LIVE_FIELDS)


@pytest.mark.django_db(transaction=True)
class NoWaitOnTheWorkflowRowTests:
    def test_a_pull_and_a_report_go_through_while_the_workflow_row_is_held(self, developer, step, workflow_spec):
        """What the hot paths write only references the workflow row (a KEY SHARE lock for the foreign key),
        which a change holding the row (`FOR NO KEY UPDATE`, as every service locks it) leaves free."""
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B"), step("C")))
        with _other_connection() as holder:
            holder.execute("SELECT id FROM coordination_workflow WHERE id = %s FOR NO KEY UPDATE", [workflow.id])
            with connection.cursor() as cursor:
                cursor.execute("SET lock_timeout = '2s'")  # a wait would fail the test, not hang it
            try:
                step_id, token = pull(developer)
                answer = report(developer, step_id, token)
                assert answer.status_code == 200, answer.content
                assert answer.json()["workflow_status"] == "running"
            finally:
                with connection.cursor() as cursor:
                    cursor.execute("RESET lock_timeout")
            holder.rollback()
        assert _live(workflow.id)[:4] == (0, 2, 0, 1)

    def test_a_fold_skips_a_row_another_transaction_holds(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        pull(developer)
        with _other_connection() as holder:
            holder.execute("SELECT id FROM coordination_workflow WHERE id = %s FOR NO KEY UPDATE", [workflow.id])
            assert workflow_counters.workflow_fold([workflow.id]) == 0  # did not wait
            holder.rollback()
        assert WorkflowDelta.objects.filter(workflow=workflow).count() == 1
        assert workflow_counters.workflow_fold([workflow.id]) == 1

    def test_a_move_that_waited_for_the_row_counts_from_the_row_it_waited_for(self, developer, step, workflow_spec):
        """A step taken back (in_progress -1) while another transaction folds the pull that leased it. Moved by
        a statement that waited for the row in a snapshot taken before the fold committed, PostgreSQL checked
        the counters on the row as that snapshot saw it (in_progress 0 - 1) and refused the change."""
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        pull(developer)  # a delta: ready -1, in_progress +1; the row still says ready 2, in_progress 0
        outcome: dict = {}

        def take_back() -> None:
            try:
                with transaction.atomic():
                    outcome["snapshot"] = workflow_counters.workflow_move(
                        workflow.id, {StepStatus.IN_PROGRESS: -1, StepStatus.FAILED: 1})
            except Exception as exc:  # noqa: BLE001 - reported below
                outcome["error"] = exc
            finally:
                connection.close()

        with _other_connection() as folder:
            folder.execute("SELECT id FROM coordination_workflow WHERE id = %s FOR NO KEY UPDATE", [workflow.id])
            folder.execute(workflow_counters.WORKFLOW_FOLD_SQL, {"workflows": [workflow.id]})
            mover = threading.Thread(target=take_back)
            mover.start()
            with _other_connection() as watcher:
                watcher.autocommit = True  # pg_stat_activity is read afresh in each transaction
                wait_until_a_backend_waits_on_a_lock(watcher.cursor())
            folder.commit()
        mover.join(10)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["snapshot"].counts["in_progress"] == 0 and outcome["snapshot"].counts["ready"] == 1
        assert _live(workflow.id)[:4] == (0, 1, 0, 0) and not WorkflowDelta.objects.filter(workflow=workflow).exists()


@pytest.mark.django_db(transaction=True)
class EventOrderTests:
    def test_an_event_of_a_running_transaction_is_held_back_and_then_read_in_order(self, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        [created] = selectors.workflow_events(workflow=workflow)[0]
        with _other_connection() as slow:
            # A transaction that started writing first, and commits last.
            slow.execute("INSERT INTO coordination_event (workflow_id, kind, data, at) "
                         "VALUES (%s, 'slow', '{}', now())", [workflow.id])
            with transaction.atomic():
                event_log.event_record(kind="fast", workflow_id=workflow.id)
            # The fast event is committed, but a reader that took it and went on from its seq would miss the
            # slow one (numbered below it) when it commits: neither is read yet.
            assert [e.kind for e in selectors.workflow_events(workflow=workflow)[0]] == ["workflow.created"]
            assert selectors.workflow_last_seq(workflow.id) == created.seq
            slow.commit()
        events, _ = selectors.workflow_events(workflow=workflow, after=created.seq)
        assert [e.kind for e in events] == ["slow", "fast"]  # in the order they began writing

    def test_a_transaction_reads_its_own_events_even_behind_an_older_one(self, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        with _other_connection() as older:
            older.execute("INSERT INTO coordination_event (workflow_id, kind, data, at) "
                          "VALUES (%s, 'older', '{}', now())", [workflow.id])
            with transaction.atomic():
                event_log.event_record(kind="mine", workflow_id=workflow.id)
                kinds = [e.kind for e in selectors.workflow_events(workflow=workflow)[0]]
                assert kinds == ["workflow.created", "mine"]  # not the older one's, still running
            older.rollback()

    def test_one_transactions_events_are_numbered_in_order_up_to_its_limit(self, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        with transaction.atomic():
            events = event_log.event_record_many(
                [workflow_counters.new_event(f"e{i}", workflow_id=workflow.id) for i in range(5)])
            seqs = [event.seq for event in events]
            assert seqs == sorted(seqs) and seqs[-1] - seqs[0] == 4  # consecutive within the transaction
        assert [e.kind for e in Event.objects.filter(workflow=workflow).order_by("seq")][1:] == [
            f"e{i}" for i in range(5)]
        with pytest.raises((DataError, OperationalError), match="at most 1048575 events"):
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SELECT set_config('coordination.event_n', '1048575', true)")
                event_log.event_record(kind="one too many", workflow_id=workflow.id)
        assert not Event.objects.filter(kind="one too many").exists()


@pytest.mark.django_db
class SettleAfterReportTests:
    """Reports of a workflow's last steps, applied at once, may each see the others still open; each of them
    (nothing else ready for an agent) settles after its commit, where every committed change is counted."""

    def _settles(self, monkeypatch) -> list:
        from coordination.services import workflow_control

        calls: list = []
        original = workflow_control.workflow_settle
        monkeypatch.setattr(workflow_control, "workflow_settle",
                            lambda **kwargs: calls.append(kwargs["workflow_id"]) or original(**kwargs))
        return calls

    def test_a_report_with_only_a_persons_decision_left_settles_after_its_commit(
            self, developer, step, workflow_spec, monkeypatch):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("H", role="human")))
        settles = self._settles(monkeypatch)
        step_id, token = pull(developer)
        assert report(developer, step_id, token).json()["workflow_status"] == "running"
        # H may be being approved at this very moment, its statement blind to this report: this one settles.
        assert settles == [workflow.id]

    def test_a_report_with_other_steps_ready_leaves_settling_to_their_reports(
            self, developer, step, workflow_spec, monkeypatch):
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        settles = self._settles(monkeypatch)
        step_id, token = pull(developer)
        assert report(developer, step_id, token).json()["workflow_status"] == "running"
        assert settles == []  # B is still to be pulled; its report comes later
