"""Authorization matrix of the worker endpoints, and who may submit and control workflows."""

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from rest_framework.test import APIClient

from coordination.services import agent_registry, tokens, workflow_creation
from coordination.models import Step, Workflow

pytestmark = pytest.mark.django_db


@pytest.fixture
def held(developer, step, workflow_spec):
    """A step held by `developer`: (step id, lease token)."""
    workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
    body = developer.client().get("/v1/tasks/developer/ready").json()
    return body["step"]["id"], body["lease"]["token"]


def _calls(step_id, token):
    return {
        "pull": ("get", "/v1/tasks/developer/ready", None),
        "heartbeat": ("post", f"/v1/steps/{step_id}/heartbeat", {"lease_token": token}),
        "report": ("post", "/v1/report_result", {"step_id": step_id, "lease_token": token, "status": "completed"}),
        "release": ("post", f"/v1/steps/{step_id}/release", {"lease_token": token}),
        "me": ("get", "/v1/agents/me", None),
    }


def _call(client, method, url, body):
    return getattr(client, method)(url, body, format="json") if body is not None else getattr(client, method)(url)


ENDPOINTS = ["pull", "heartbeat", "report", "release", "me"]


class AuthorizationMatrixTests:
    @pytest.mark.parametrize("endpoint", ENDPOINTS)
    def test_no_token_is_401(self, held, endpoint):
        method, url, body = _calls(*held)[endpoint]
        response = _call(APIClient(), method, url, body)
        assert response.status_code == 401
        assert response.json()["error"] == "unauthenticated"
        assert response["WWW-Authenticate"] == "Bearer"

    @pytest.mark.parametrize("endpoint", ENDPOINTS)
    def test_a_wrong_token_is_401(self, held, endpoint):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION="Bearer am_not-a-real-token")
        method, url, body = _calls(*held)[endpoint]
        response = _call(client, method, url, body)
        assert response.status_code == 401
        assert "Unknown token" in response.json()["detail"]

    @pytest.mark.parametrize("endpoint", ENDPOINTS)
    def test_a_disabled_agents_token_is_401(self, held, developer, endpoint):
        # `held` made requests with this token, so the agent is cached: the service's own invalidation refuses it at
        # once (a change committed elsewhere, even by hand in SQL, is the live test's: test_live_server.py).
        agent_registry.agent_set_enabled(agent_id=developer.agent.id, enabled=False)
        method, url, body = _calls(*held)[endpoint]
        response = _call(developer.client(), method, url, body)
        assert response.status_code == 401
        assert "disabled" in response.json()["detail"]

    @pytest.mark.parametrize("endpoint", ["heartbeat", "report", "release"])
    def test_an_agent_that_does_not_hold_the_step_is_403_and_changes_nothing(self, held, other_developer, endpoint):
        method, url, body = _calls(*held)[endpoint]
        response = _call(other_developer.client(), method, url, body)
        assert response.status_code == 403
        assert response.json()["error"] == "forbidden"
        assert Step.objects.get(id=held[0]).status == "in_progress"

    def test_an_agent_without_the_role_cannot_pull(self, held, outsider):
        response = outsider.client().get("/v1/tasks/developer/ready")
        assert response.status_code == 403

    def test_a_user_cannot_use_the_worker_endpoints(self, held, owner_client):
        for endpoint in ["pull", "heartbeat", "report"]:
            method, url, body = _calls(*held)[endpoint]
            assert _call(owner_client, method, url, body).status_code == 403

    def test_a_malformed_authorization_header_is_401(self):
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION="Token abc")
        assert client.get("/v1/agents").status_code == 401
        client.credentials(HTTP_AUTHORIZATION="Bearer a b")
        assert client.get("/v1/agents").status_code == 401


WORKFLOW = {"name": "w", "steps": [{"key": "A", "role": "developer"}]}


class SubmitPermissionTests:
    def test_an_agent_without_can_submit_may_read_but_not_create_or_control(self, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        client = developer.client()
        assert client.get(f"/v1/workflows/{workflow.id}/status").status_code == 200
        assert client.post("/v1/workflows", WORKFLOW, format="json").status_code == 403
        assert client.post(f"/v1/workflows/{workflow.id}/cancel").status_code == 403
        assert Workflow.objects.count() == 1

    def test_an_agent_with_can_submit_may_create_and_control(self, submitter):
        response = submitter.client().post("/v1/workflows", WORKFLOW, format="json")
        assert response.status_code == 201
        workflow = Workflow.objects.get(id=response.json()["id"])
        assert workflow.created_by_agent == submitter.agent
        assert submitter.client().post(f"/v1/workflows/{workflow.id}/pause").status_code == 200

    def test_a_user_token_may_create(self, owner):
        token = tokens.user_token_create(user=owner, name="ci")
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        response = client.post("/v1/workflows", WORKFLOW, format="json")
        assert response.status_code == 201
        assert Workflow.objects.get(id=response.json()["id"]).created_by_user == owner

    def test_a_session_write_needs_csrf(self, owner):
        client = Client(enforce_csrf_checks=True)
        client.force_login(owner)
        response = client.post("/v1/workflows", WORKFLOW, content_type="application/json")
        assert response.status_code == 403
        assert "CSRF" in response.json()["detail"]
        assert client.get("/v1/workflows").status_code == 200
        assert Workflow.objects.count() == 0

    def test_a_session_write_with_csrf_passes(self, owner):
        client = Client(enforce_csrf_checks=True)
        client.force_login(owner)
        client.get("/admin/login/")  # any page that sets the CSRF cookie
        page = client.get("/accounts/login/")
        token = page.cookies["csrftoken"].value
        response = client.post("/v1/workflows", WORKFLOW, content_type="application/json", HTTP_X_CSRFTOKEN=token)
        assert response.status_code == 201, response.content
        assert get_user_model().objects.count() == 1
