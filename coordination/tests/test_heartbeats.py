"""Heartbeats: they extend the lease, store the agent's iterations once, and refuse a stale lease."""

from datetime import timedelta

import pytest
from django.utils import timezone

from coordination.models import Event, FileLock, Iteration, Step
from coordination.services import leases, workflow_control, workflow_creation
from coordination.services.leases import IterationIn
from coordination.tests.agent_calls import heartbeat, pull

pytestmark = pytest.mark.django_db


class HeartbeatTests:
    def test_it_extends_the_lease_and_stores_iterations(self, developer, step, workflow_spec):
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

    def test_it_refuses_an_expired_lease(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, token = pull(developer)
        Step.objects.filter(id=step_id).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        response = heartbeat(developer, step_id, token)
        assert response.status_code == 409
        assert response.json()["error"] == "stale_lease"

    def test_it_refuses_a_wrong_token_from_the_holder(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, _ = pull(developer)
        assert heartbeat(developer, step_id, "ls_forged").status_code == 409

    def test_the_common_heartbeat_is_one_round_trip_that_carries_the_steps_locks_along(
            self, developer, step, workflow_spec, django_assert_num_queries, monkeypatch):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("A", lease_ttl_s=60, files=(("src/a.py", "write"),))))
        step_id, token = pull(developer)
        soon = timezone.now() + timedelta(seconds=5)
        Step.objects.filter(id=step_id).update(lease_expires_at=soon)
        FileLock.objects.filter(step_id=step_id).update(expires_at=soon)
        published = []
        monkeypatch.setattr(leases, "inserted_event_published", published.append)
        with django_assert_num_queries(2):  # the step's lock and the heartbeat, sent together
            answer = leases.step_heartbeat(step_id=step_id, agent=developer.agent, lease_token=token, iterations=[
                IterationIn(index=1, thought="look", action="list_files"), IterationIn(index=2, action="write_file")])
        lease_end = Step.objects.get(id=step_id).lease_expires_at
        assert answer == {"expires_at": lease_end, "cancel": False} and lease_end > soon + timedelta(seconds=50)
        assert FileLock.objects.get(step_id=step_id).expires_at == lease_end, "the lease's locks follow it"
        stored = Event.objects.get(kind="step.progress")
        assert [(e.id, e.seq, e.workflow_id, e.step_id, e.agent_id, e.data) for e in published] == [
            (stored.id, stored.seq, workflow.id, step_id, developer.agent.id,
             {"step": "A", "attempt": 1, "iterations": [1, 2]})]
        assert list(Iteration.objects.order_by("index").values_list("index", "thought", "action")) == [
            (1, "look", "list_files"), (2, "", "write_file")]
        published.clear()
        with django_assert_num_queries(2):  # a retried heartbeat: nothing new, no event
            leases.step_heartbeat(step_id=step_id, agent=developer.agent, lease_token=token,
                                  iterations=[IterationIn(index=2, action="write_file")])
        assert not published and Iteration.objects.count() == 2
        # Paused: still one round trip; the lease goes on (the step may be handed back) and the agent is asked to stop.
        workflow_control.workflow_pause(workflow_id=workflow.id)
        with django_assert_num_queries(2):
            paused = leases.step_heartbeat(step_id=step_id, agent=developer.agent, lease_token=token)
        assert paused["cancel"] is True and paused["expires_at"] == Step.objects.get(id=step_id).lease_expires_at

    def test_a_heartbeat_the_statement_does_not_apply_to_writes_nothing_and_is_told_apart(
            self, developer, other_developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A", files=(("src/a.py", "write"),))))
        step_id, token = pull(developer)
        before = (Step.objects.get(id=step_id).lease_expires_at, FileLock.objects.get(step_id=step_id).expires_at)
        iterations = [{"iteration": 1, "thought": "t", "action": "a", "observation": "o"}]
        assert heartbeat(other_developer, step_id, token, iterations=iterations).status_code == 403  # never held it
        assert heartbeat(developer, step_id, "ls_forged", iterations=iterations).status_code == 409
        after = (Step.objects.get(id=step_id).lease_expires_at, FileLock.objects.get(step_id=step_id).expires_at)
        assert after == before
        assert not Iteration.objects.exists() and not Event.objects.filter(kind="step.progress").exists()

    def test_a_heartbeat_refused_for_a_conflict_is_applied_by_the_transaction_path(
            self, developer, step, workflow_spec, monkeypatch):
        workflow_creation.workflow_create(spec=workflow_spec(
            step("A", lease_ttl_s=60, files=(("src/a.py", "write"),))))
        step_id, token = pull(developer)
        soon = timezone.now() + timedelta(seconds=5)
        Step.objects.filter(id=step_id).update(lease_expires_at=soon)
        # As if PostgreSQL had refused the one-round-trip statement (a deadlock, a lock timeout): nothing written.
        monkeypatch.setattr(leases.lock_order, "unless_conflict", lambda run: None)
        answer = heartbeat(developer, step_id, token, iterations=[{"iteration": 1, "action": "a"}])
        assert answer.status_code == 200 and answer.json()["cancel"] is False
        lease_end = Step.objects.get(id=step_id).lease_expires_at
        assert lease_end > soon + timedelta(seconds=50)
        assert FileLock.objects.get(step_id=step_id).expires_at == lease_end
        assert list(Iteration.objects.values_list("index", flat=True)) == [1]
        assert Event.objects.get(kind="step.progress").data["iterations"] == [1]
