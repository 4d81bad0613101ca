"""The dashboard's pages, through the Django test client: what a logged-in person sees."""

import re

import pytest

from coordination.models import FileLock, Step, Workflow
from coordination.services import workflow_creation

pytestmark = pytest.mark.django_db

PAGES = ["/", "/agents/", "/locks/", "/submit/"]


class PageTests:
    @pytest.mark.parametrize("url", PAGES)
    def test_it_sends_an_anonymous_visitor_to_the_login(self, client, url):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")

    def test_it_logs_a_person_in(self, client, owner):
        response = client.post("/accounts/login/", {"username": "owner", "password": "pw-owner-123"})
        assert response.status_code == 302
        assert client.get("/").status_code == 200

    def test_it_shows_workflows_agents_and_events_on_the_overview(self, owner_browser, workflow):
        html = owner_browser.get("/").content.decode()
        assert f'id="workflow-{workflow.id}"' in html and 'data-status="running"' in html
        assert "dev-1" in html and "step.leased" in html
        assert 'ws-connect="/ws/overview/"' in html
        assert "vendor/htmx/htmx-2.0.11.min.js" in html and "cdn" not in html.lower()

    def test_it_filters_the_overview_by_status_and_project(self, owner_browser, workflow, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("X"), name="Elsewhere", project="other"))
        other = Workflow.objects.get(name="Elsewhere")
        html = owner_browser.get("/?project=other").content.decode()
        assert f'id="workflow-{other.id}"' in html and f'id="workflow-{workflow.id}"' not in html
        assert f'id="workflow-{workflow.id}"' not in owner_browser.get("/?status=completed").content.decode()

    def test_it_shows_every_step_of_a_workflow_with_its_id_and_status(self, owner_browser, workflow):
        html = owner_browser.get(f"/workflows/{workflow.id}/").content.decode()
        for row in Step.objects.filter(workflow=workflow):
            assert re.search(rf'id="step-{row.id}" data-status="{row.status}"', html), row.key
            assert f'id="dag-{row.id}"' in html
        assert "<svg" in html and "src/a.py" in html  # the DAG, and the lock held
        assert f'ws-connect="/ws/workflows/{workflow.id}/"' in html

    def test_it_shows_a_steps_reasoning_attempts_and_inputs(self, owner_browser, workflow):
        a = Step.objects.get(workflow=workflow, key="A")
        html = owner_browser.get(f"/steps/{a.id}/").content.decode()
        assert "Look around first" in html and "list_files" in html and "dev-1" in html
        assert f'ws-connect="/ws/steps/{a.id}/"' in html

    def test_it_answers_404_for_unknown_ids(self, owner_browser):
        import uuid

        assert owner_browser.get(f"/workflows/{uuid.uuid4()}/").status_code == 404
        assert owner_browser.get(f"/steps/{uuid.uuid4()}/").status_code == 404

    def test_it_lists_agents_and_locks(self, owner_browser, workflow):
        assert "dev-1" in owner_browser.get("/agents/").content.decode()
        html = owner_browser.get("/locks/").content.decode()
        lock = FileLock.objects.get(path="src/a.py")
        assert "src/a.py" in html and f"<td>{lock.fencing}</td>" in html
        assert "Force release" not in html  # not staff
