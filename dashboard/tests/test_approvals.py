"""Approval steps (role `human`): agents never pull them; a person approves or rejects them once they are ready."""

import html

import pytest

from coordination.errors import InvalidRequest
from coordination.models import Agent, Attempt, Event, Step
from coordination.services import agent_registry, reports, tokens

pytestmark = pytest.mark.django_db


def _complete(key="A"):
    """Complete the step the developer holds (its lease token derives from the attempt)."""
    step_row = Step.objects.get(key=key, status="in_progress")
    return reports.step_report(step_id=step_row.id, agent=step_row.lease_agent,
                                lease_token=tokens.lease_token_for(step_row.lease_attempt_id),
                                outcome=reports.Outcome(status="completed", final_result="done"))


class ApprovalTests:
    def test_it_lets_a_person_approve_a_step_agents_never_pull(self, owner_browser, workflow, developer):
        _complete()
        human = Step.objects.get(workflow=workflow, key="H")
        assert human.status == "ready"
        assert Agent.objects.filter(roles__contains=["human"]).count() == 0
        page = owner_browser.get(f"/workflows/{workflow.id}/").content.decode()
        assert "Approve" in page and "Reject" in page
        response = owner_browser.post(f"/steps/{human.id}/decide", {"decision": "approve", "comment": "Looks right"})
        assert response.status_code == 302
        human.refresh_from_db()
        assert human.status == "completed" and "Looks right" in human.final_result
        assert human.attempts.get().agent is None

    def test_it_fails_a_rejected_step_with_the_comment(self, owner_browser, workflow, developer):
        _complete()
        human = Step.objects.get(workflow=workflow, key="H")
        owner_browser.post(f"/steps/{human.id}/decide", {"decision": "reject", "comment": "Not convincing"})
        human.refresh_from_db()
        assert human.status == "failed" and "Not convincing" in human.error

    def test_it_refuses_a_decision_before_the_step_is_ready(self, owner_browser, workflow):
        human = Step.objects.get(workflow=workflow, key="H")
        events = Event.objects.filter(workflow=workflow).count()
        response = owner_browser.post(f"/steps/{human.id}/decide", {"decision": "approve"}, follow=True)
        assert response.redirect_chain == [(f"/workflows/{workflow.id}/", 302)]
        page = html.unescape(response.content.decode())
        assert "Step 'H' is pending; it can be decided once it is ready." in page
        human.refresh_from_db()
        assert (human.status, human.attempt, human.final_result) == ("pending", 0, "")
        assert not Attempt.objects.filter(step=human).exists()
        assert Event.objects.filter(workflow=workflow).count() == events
        workflow.refresh_from_db()
        assert (workflow.status, workflow.n_completed) == ("running", 0)

    def test_it_keeps_the_human_role_from_agents(self):
        with pytest.raises(InvalidRequest):
            agent_registry.agent_create(name="sneaky", roles=["human"])
