"""What a person does from the dashboard: pause, resume and cancel a workflow, retry a step, force-release a lock."""

import pytest
from django.test import Client

from coordination.models import FileLock, Step
from coordination.services import reports, tokens

pytestmark = pytest.mark.django_db


class ActionTests:
    def test_it_pauses_resumes_and_cancels(self, owner_browser, workflow):
        for action, status in [("pause", "paused"), ("resume", "running"), ("cancel", "cancelled")]:
            response = owner_browser.post(f"/workflows/{workflow.id}/{action}")
            assert response.status_code == 302
            workflow.refresh_from_db()
            assert workflow.status == status

    def test_it_redirects_an_htmx_client(self, owner_browser, workflow):
        response = owner_browser.post(f"/workflows/{workflow.id}/pause", HTTP_HX_REQUEST="true")
        assert response.status_code == 200 and response["HX-Redirect"] == f"/workflows/{workflow.id}/"

    def test_it_needs_post_and_csrf(self, owner, workflow):
        client = Client(enforce_csrf_checks=True)
        client.force_login(owner)
        assert client.get(f"/workflows/{workflow.id}/pause").status_code == 405
        assert client.post(f"/workflows/{workflow.id}/pause").status_code == 403
        workflow.refresh_from_db()
        assert workflow.status == "running"

    def test_it_retries_a_failed_step(self, owner_browser, workflow, developer):
        a = Step.objects.get(workflow=workflow, key="A")
        reports.step_report(step_id=a.id, agent=developer.agent, lease_token=tokens.lease_token_for(a.lease_attempt_id),
                             outcome=reports.Outcome(status="failed", error="boom"))
        assert 'action="/steps/%s/retry"' % a.id in owner_browser.get(f"/workflows/{workflow.id}/").content.decode()
        owner_browser.post(f"/steps/{a.id}/retry")
        a.refresh_from_db()
        assert a.status == "ready"

    def test_it_lets_only_staff_force_release_a_lock(self, owner_browser, workflow, staff):
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
