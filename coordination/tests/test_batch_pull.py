"""Batch pulls (`GET /v1/tasks/{role}/ready?max=N`): several leases in one request, within capacity."""

import pytest

from coordination.models import Attempt, Step, StepStatus, Workflow
from coordination.services import file_locks, reports, workflow_creation

pytestmark = pytest.mark.django_db


def _pull(agent, query="max=8", roles="developer", **headers):
    return agent.client().get(f"/v1/tasks/{roles}/ready?{query}", **headers)


def _complete(agent, lease):
    reports.step_report(step_id=lease["step"]["id"], agent=agent.agent, lease_token=lease["lease"]["token"],
                        outcome=reports.Outcome(status="completed"))


class BatchPullTests:
    def test_it_leases_several_steps_best_first_each_with_its_own_token(self, make_agent, step, workflow_spec):
        agent = make_agent("batcher", ["developer"], capacity=8)
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("low"), step("high", priority=5), step("mid", priority=2), step("later", "low")))
        response = _pull(agent, "max=8")
        assert response.status_code == 200
        assert response["Cache-Control"] == "no-store"
        leases = response.json()["leases"]
        assert [lease["step"]["key"] for lease in leases] == ["high", "mid", "low"]  # `later` is not ready
        assert len({lease["lease"]["token"] for lease in leases}) == 3
        for lease in leases:
            assert lease["workflow"]["id"] == str(workflow.id)
            stored = Step.objects.get(id=lease["step"]["id"])
            assert stored.status == StepStatus.IN_PROGRESS and stored.lease_agent == agent.agent
        workflow.refresh_from_db()
        assert (workflow.n_pending, workflow.n_ready, workflow.n_in_progress) == (1, 0, 3)
        # Each token is the one of its own step: reporting with it works.
        for lease in leases:
            _complete(agent, lease)
        assert _pull(agent, "max=8").json()["leases"][0]["step"]["key"] == "later"

    def test_it_never_leases_more_than_the_free_capacity(self, make_agent, step, workflow_spec):
        agent = make_agent("small", ["developer"], capacity=3)
        workflow_creation.workflow_create(spec=workflow_spec(*(step(f"S{i}") for i in range(6))))
        assert _pull(agent, "").status_code == 200  # one held by a single pull
        assert len(_pull(agent, "max=10").json()["leases"]) == 2
        assert Step.objects.filter(lease_agent=agent.agent, status=StepStatus.IN_PROGRESS).count() == 3
        refused = _pull(agent, "max=2")
        assert refused.status_code == 429
        assert refused.json()["error"] == "at_capacity" and refused.json()["capacity"] == 3

    def test_max_one_keeps_the_batch_shape_and_no_max_the_single_shape(self, make_agent, step, workflow_spec):
        agent = make_agent("shapes", ["developer"], capacity=4)
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        batch = _pull(agent, "max=1").json()
        assert list(batch) == ["leases"] and len(batch["leases"]) == 1
        single = _pull(agent, "").json()
        assert set(single) == {"step", "workflow", "lease"}

    def test_it_answers_204_when_nothing_is_ready(self, make_agent):
        agent = make_agent("idle", ["developer"], capacity=4)
        assert _pull(agent, "max=4").status_code == 204

    def test_it_leases_only_roles_the_agent_asked_for(self, make_agent, step, workflow_spec):
        agent = make_agent("both", ["developer", "tester"], capacity=8)
        workflow_creation.workflow_create(spec=workflow_spec(
            step("d1"), step("t1", role="tester"), step("w1", role="writer"), step("d2")))
        leases = _pull(agent, "max=8", roles="developer").json()["leases"]
        assert sorted(lease["step"]["key"] for lease in leases) == ["d1", "d2"]
        leases = _pull(agent, "max=8", roles="developer,tester").json()["leases"]
        assert [lease["step"]["key"] for lease in leases] == ["t1"]
        assert _pull(agent, "max=8", roles="writer").status_code == 403

    @pytest.mark.parametrize("value", ["0", "51", "-1", "2.5", "abc", "", " 3", "1e1"])
    def test_it_refuses_a_bad_max(self, make_agent, step, workflow_spec, value):
        agent = make_agent("careful", ["developer"], capacity=4)
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        response = _pull(agent, f"max={value}")
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_request" and "max" in response.json()["detail"]
        assert not Attempt.objects.exists()

    def test_a_repeated_idempotency_key_gets_the_same_leases_back(self, make_agent, step, workflow_spec):
        agent = make_agent("retrier", ["developer"], capacity=8)
        workflow_creation.workflow_create(spec=workflow_spec(*(step(f"S{i}") for i in range(5))))
        first = _pull(agent, "max=3", HTTP_IDEMPOTENCY_KEY="batch-1").json()["leases"]
        again = _pull(agent, "max=3", HTTP_IDEMPOTENCY_KEY="batch-1").json()["leases"]
        assert [lease["step"]["id"] for lease in again] == [lease["step"]["id"] for lease in first]
        assert [lease["lease"]["token"] for lease in again] == [lease["lease"]["token"] for lease in first]
        assert Attempt.objects.count() == 3
        for lease in first:
            _complete(agent, lease)
        reused = _pull(agent, "max=3", HTTP_IDEMPOTENCY_KEY="batch-1")
        assert reused.status_code == 409 and reused.json()["error"] == "conflict"

    def test_a_step_whose_files_are_locked_is_passed_over_for_the_next(self, make_agent, step, workflow_spec):
        holder = make_agent("holder", ["developer"], capacity=1)
        agent = make_agent("puller", ["developer"], capacity=8)
        workflow_creation.workflow_create(spec=workflow_spec(
            step("blocked", files=(("src/a.py", "write"),), priority=9), step("free1", priority=2), step("free2")))
        file_locks.locks_acquire(agent=holder.agent, paths=["src/a.py"], mode="write")
        leases = _pull(agent, "max=8").json()["leases"]
        assert [lease["step"]["key"] for lease in leases] == ["free1", "free2"]
        assert Step.objects.get(key="blocked").status == StepStatus.READY

    def test_the_declared_files_come_locked_with_each_lease(self, make_agent, step, workflow_spec):
        agent = make_agent("filer", ["developer"], capacity=8)
        workflow_creation.workflow_create(spec=workflow_spec(
            step("A", files=(("src/a.py", "write"),), priority=1), step("B", files=(("src/b.py", "write"),))))
        leases = _pull(agent, "max=2").json()["leases"]
        assert [[lock["path"] for lock in lease["lease"]["locks"]] for lease in leases] == [["src/a.py"], ["src/b.py"]]

    def test_the_event_log_records_every_lease_in_order(self, make_agent, step, workflow_spec):
        agent = make_agent("logged", ["developer"], capacity=8)
        workflow = workflow_creation.workflow_create(spec=workflow_spec(*(step(f"S{i}") for i in range(4))))
        leases = _pull(agent, "max=4").json()["leases"]
        events = list(workflow.events.filter(kind="step.leased").order_by("seq"))
        assert [event.data["step"] for event in events] == [lease["step"]["key"] for lease in leases]
        assert Workflow.objects.get(id=workflow.id).n_in_progress == 4
