"""A dead agent's lease runs out: the sweep hands the step to another agent or fails it; live leases stay."""

import pytest

from coordination.models import Attempt, AttemptOutcome, Event, Step, StepStatus
from coordination.services import leases, workflow_creation
from coordination.tests.agent_calls import expire, pull, report

pytestmark = pytest.mark.django_db


class LeaseExpiryTests:
    def test_it_hands_an_expired_lease_to_another_agent_and_refuses_the_late_report(self, developer, other_developer,
                                                                                    step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, first_token = pull(developer)
        assert expire(step_id) == 1
        step_id_again, second_token = pull(other_developer)
        assert step_id_again == step_id
        late = report(developer, step_id, first_token, final_result="zombie result")
        assert late.status_code == 409 and late.json()["error"] == "stale_lease"
        assert Event.objects.filter(kind="step.stale_report", agent=developer.agent).exists()
        assert report(other_developer, step_id, second_token, final_result="real result").status_code == 200
        stored = Step.objects.get(id=step_id)
        assert stored.final_result == "real result" and stored.attempt == 2
        assert list(Attempt.objects.filter(step_id=step_id).order_by("number").values_list("agent__name", "outcome")) == [
            ("dev-1", AttemptOutcome.EXPIRED), ("dev-2", AttemptOutcome.COMPLETED)]

    def test_it_fails_the_step_when_no_attempts_are_left(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A", max_attempts=1)))
        step_id, _ = pull(developer)
        expire(step_id)
        assert Step.objects.get(id=step_id).status == StepStatus.FAILED
        workflow.refresh_from_db()
        assert workflow.status == "failed"

    def test_it_leaves_live_leases_alone(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        step_id, _ = pull(developer)
        assert leases.leases_sweep() == 0
        assert Step.objects.get(id=step_id).status == StepStatus.IN_PROGRESS
