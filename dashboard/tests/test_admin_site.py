"""The Django admin, as staff reach it beside the dashboard: every model listed, actions through the services."""

import pytest

from coordination.models import FileLock, Step

pytestmark = pytest.mark.django_db


class AdminSiteTests:
    def test_it_lists_every_model(self, staff_browser, workflow):
        for model in ["project", "agent", "workflow", "step", "attempt", "result", "auditreport", "filelock", "event",
                      "usertoken"]:
            assert staff_browser.get(f"/admin/coordination/{model}/").status_code == 200, model
        assert staff_browser.get(f"/admin/coordination/workflow/{workflow.id}/change/").status_code == 200
        a = Step.objects.get(workflow=workflow, key="A")
        assert staff_browser.get(f"/admin/coordination/step/{a.id}/change/").status_code == 200

    def test_it_runs_admin_actions_through_the_services(self, staff_browser, workflow, developer):
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
