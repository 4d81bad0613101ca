"""Every page and action of the dashboard, through the Django test client."""

import re

import pytest
from django.test import Client

from coordination.services import agent_registry, leases, pull, reports, tokens, workflow_creation
from coordination.models import Agent, FileLock, Step, Workflow
from coordination.tests.factories import step, workflow_spec

pytestmark = pytest.mark.django_db


@pytest.fixture
def workflow(developer):
    workflow = workflow_creation.workflow_create(spec=workflow_spec(
        step("A", files=(("src/a.py", "write"),)), step("B", "A"), step("H", "A", role="human"), name="Dash"))
    lease = pull.step_pull(agent=developer.agent, roles=["developer"])
    leases.step_heartbeat(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token, iterations=[
        leases.IterationIn(index=1, thought="Look around first", action='{"tool": "list_files"}', observation="src/")])
    return workflow


def _complete(key="A"):
    """Complete the step the developer holds (its lease token derives from the attempt)."""
    step_row = Step.objects.get(key=key, status="in_progress")
    return reports.step_report(step_id=step_row.id, agent=step_row.lease_agent,
                                lease_token=tokens.lease_token_for(step_row.lease_attempt_id),
                                outcome=reports.Outcome(status="completed", final_result="done"))


PAGES = ["/", "/agents/", "/locks/", "/submit/"]


class PageTests:
    @pytest.mark.parametrize("url", PAGES)
    def test_pages_need_a_login(self, client, url):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")

    def test_the_login_page_works(self, client, owner):
        response = client.post("/accounts/login/", {"username": "owner", "password": "pw-owner-123"})
        assert response.status_code == 302
        assert client.get("/").status_code == 200

    def test_overview_shows_workflows_agents_and_events(self, owner_browser, workflow):
        html = owner_browser.get("/").content.decode()
        assert f'id="workflow-{workflow.id}"' in html and 'data-status="running"' in html
        assert "dev-1" in html and "step.leased" in html
        assert 'ws-connect="/ws/overview/"' in html
        assert "vendor/htmx/htmx-2.0.11.min.js" in html and "cdn" not in html.lower()

    def test_overview_filters_by_status_and_project(self, owner_browser, workflow):
        workflow_creation.workflow_create(spec=workflow_spec(step("X"), name="Elsewhere", project="other"))
        other = Workflow.objects.get(name="Elsewhere")
        html = owner_browser.get("/?project=other").content.decode()
        assert f'id="workflow-{other.id}"' in html and f'id="workflow-{workflow.id}"' not in html
        assert f'id="workflow-{workflow.id}"' not in owner_browser.get("/?status=completed").content.decode()

    def test_workflow_page_shows_every_step_with_its_id_and_status(self, owner_browser, workflow):
        html = owner_browser.get(f"/workflows/{workflow.id}/").content.decode()
        for row in Step.objects.filter(workflow=workflow):
            assert re.search(rf'id="step-{row.id}" data-status="{row.status}"', html), row.key
            assert f'id="dag-{row.id}"' in html
        assert "<svg" in html and "src/a.py" in html  # the DAG, and the lock held
        assert f'ws-connect="/ws/workflows/{workflow.id}/"' in html

    def test_step_page_shows_the_reasoning_attempts_and_inputs(self, owner_browser, workflow):
        a = Step.objects.get(workflow=workflow, key="A")
        html = owner_browser.get(f"/steps/{a.id}/").content.decode()
        assert "Look around first" in html and "list_files" in html and "dev-1" in html
        assert f'ws-connect="/ws/steps/{a.id}/"' in html

    def test_unknown_ids_are_404(self, owner_browser):
        import uuid

        assert owner_browser.get(f"/workflows/{uuid.uuid4()}/").status_code == 404
        assert owner_browser.get(f"/steps/{uuid.uuid4()}/").status_code == 404

    def test_agents_and_locks_pages(self, owner_browser, workflow):
        assert "dev-1" in owner_browser.get("/agents/").content.decode()
        html = owner_browser.get("/locks/").content.decode()
        lock = FileLock.objects.get(path="src/a.py")
        assert "src/a.py" in html and f"<td>{lock.fencing}</td>" in html
        assert "Force release" not in html  # not staff


class ActionTests:
    def test_pause_resume_cancel(self, owner_browser, workflow):
        for action, status in [("pause", "paused"), ("resume", "running"), ("cancel", "cancelled")]:
            response = owner_browser.post(f"/workflows/{workflow.id}/{action}")
            assert response.status_code == 302
            workflow.refresh_from_db()
            assert workflow.status == status

    def test_an_htmx_action_redirects_the_client(self, owner_browser, workflow):
        response = owner_browser.post(f"/workflows/{workflow.id}/pause", HTTP_HX_REQUEST="true")
        assert response.status_code == 200 and response["HX-Redirect"] == f"/workflows/{workflow.id}/"

    def test_actions_need_post_and_csrf(self, owner, workflow):
        client = Client(enforce_csrf_checks=True)
        client.force_login(owner)
        assert client.get(f"/workflows/{workflow.id}/pause").status_code == 405
        assert client.post(f"/workflows/{workflow.id}/pause").status_code == 403
        workflow.refresh_from_db()
        assert workflow.status == "running"

    def test_retry_a_failed_step(self, owner_browser, workflow, developer):
        a = Step.objects.get(workflow=workflow, key="A")
        reports.step_report(step_id=a.id, agent=developer.agent, lease_token=tokens.lease_token_for(a.lease_attempt_id),
                             outcome=reports.Outcome(status="failed", error="boom"))
        assert 'action="/steps/%s/retry"' % a.id in owner_browser.get(f"/workflows/{workflow.id}/").content.decode()
        owner_browser.post(f"/steps/{a.id}/retry")
        a.refresh_from_db()
        assert a.status == "ready"

    def test_only_staff_may_force_release_a_lock(self, owner_browser, workflow, staff):
        lock = FileLock.objects.get(path="src/a.py")
        assert owner_browser.post(f"/locks/{lock.id}/release").status_code == 403
        lock.refresh_from_db()
        assert lock.released_at is None
        staff_client = Client()
        staff_client.force_login(staff)
        assert "Force release" in staff_client.get("/locks/").content.decode()
        assert staff_client.post(f"/locks/{lock.id}/release").status_code == 302
        lock.refresh_from_db()
        assert lock.release_reason == "forced"


class ApprovalTests:
    def test_agents_never_pull_human_steps_and_a_person_approves(self, owner_browser, workflow, developer):
        _complete()
        human = Step.objects.get(workflow=workflow, key="H")
        assert human.status == "ready"
        assert Agent.objects.filter(roles__contains=["human"]).count() == 0
        html = owner_browser.get(f"/workflows/{workflow.id}/").content.decode()
        assert "Approve" in html and "Reject" in html
        response = owner_browser.post(f"/steps/{human.id}/decide", {"decision": "approve", "comment": "Looks right"})
        assert response.status_code == 302
        human.refresh_from_db()
        assert human.status == "completed" and "Looks right" in human.final_result
        assert human.attempts.get().agent is None

    def test_a_rejection_fails_the_step_with_the_comment(self, owner_browser, workflow, developer):
        _complete()
        human = Step.objects.get(workflow=workflow, key="H")
        owner_browser.post(f"/steps/{human.id}/decide", {"decision": "reject", "comment": "Not convincing"})
        human.refresh_from_db()
        assert human.status == "failed" and "Not convincing" in human.error

    def test_a_human_step_cannot_be_decided_before_it_is_ready(self, owner_browser, workflow):
        human = Step.objects.get(workflow=workflow, key="H")
        owner_browser.post(f"/steps/{human.id}/decide", {"decision": "approve"})
        human.refresh_from_db()
        assert human.status == "pending"

    def test_an_agent_cannot_hold_the_human_role(self):
        from coordination.errors import InvalidRequest

        with pytest.raises(InvalidRequest):
            agent_registry.agent_create(name="sneaky", roles=["human"])


class SubmitTests:
    def test_a_yaml_graph_is_submitted(self, owner_browser):
        graph = "name: From YAML\nsteps:\n  - {key: a, name: A, role: writer}\n  - {key: b, name: B, role: writer, depends_on: [a]}\n"
        response = owner_browser.post("/submit/", {"graph": graph})
        workflow = Workflow.objects.get(name="From YAML")
        assert response.status_code == 302 and response["Location"] == f"/workflows/{workflow.id}/"
        assert workflow.total_steps == 2

    def test_a_json_graph_with_a_cycle_shows_the_error_by_the_input(self, owner_browser):
        graph = '{"name": "Loop", "steps": [{"key": "a", "role": "x", "depends_on": ["b"]}, {"key": "b", "role": "x", "depends_on": ["a"]}]}'
        response = owner_browser.post("/submit/", {"graph": graph})
        assert response.status_code == 400
        html = response.content.decode()
        assert "Dependency cycle: a -&gt; b -&gt; a" in html and 'class="field-errors"' in html
        assert not Workflow.objects.filter(name="Loop").exists()

    def test_malformed_text_is_explained(self, owner_browser):
        response = owner_browser.post("/submit/", {"graph": "name: [unclosed"})
        assert response.status_code == 400 and "Not valid JSON or YAML" in response.content.decode()

    def test_a_goal_starts_planning(self, owner_browser):
        response = owner_browser.post("/submit/", {"goal": "Write a market study", "name": "Study"})
        assert response.status_code == 302
        assert Workflow.objects.get(name="Study").status == "planning"


class AdminTests:
    def test_every_model_is_listed(self, staff_browser, workflow):
        for model in ["project", "agent", "workflow", "step", "attempt", "result", "auditreport", "filelock", "event",
                      "usertoken"]:
            assert staff_browser.get(f"/admin/coordination/{model}/").status_code == 200, model
        assert staff_browser.get(f"/admin/coordination/workflow/{workflow.id}/change/").status_code == 200
        a = Step.objects.get(workflow=workflow, key="A")
        assert staff_browser.get(f"/admin/coordination/step/{a.id}/change/").status_code == 200

    def test_admin_actions_go_through_the_services(self, staff_browser, workflow, developer):
        lock = FileLock.objects.get(path="src/a.py")
        staff_browser.post("/admin/coordination/filelock/", {"action": "release_locks", "_selected_action": [lock.id]})
        lock.refresh_from_db()
        assert lock.released_at is not None and workflow.events.filter(kind="locks.released").exists()
        staff_browser.post("/admin/coordination/agent/", {"action": "disable_agents",
                                                          "_selected_action": [developer.agent.id]})
        developer.agent.refresh_from_db()
        assert developer.agent.enabled is False
        assert developer.client().get("/v1/agents/me").status_code == 401
        staff_browser.post("/admin/coordination/workflow/", {"action": "cancel_workflows",
                                                             "_selected_action": [workflow.id]})
        workflow.refresh_from_db()
        assert workflow.status == "cancelled"
        a = Step.objects.get(workflow=workflow, key="A")
        staff_browser.post("/admin/coordination/step/", {"action": "retry_steps", "_selected_action": [a.id]})
        a.refresh_from_db()
        assert a.status == "ready" and workflow.events.filter(kind="step.retried").exists()
