"""The OpenAPI schema is complete and the API keeps to it, checked by schemathesis."""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from am_project.wsgi import application
from coordination.services import agent_registry, workflow_creation

schema = schemathesis.openapi.from_wsgi("/v1/schema", application)
# Archive uploads are bytes on the wire, like a file's body.
for _archive_type in ("application/gzip", "application/x-tar", "application/zip"):
    schemathesis.serializer.alias(_archive_type, "application/octet-stream")


@schemathesis.check
def rejects_negative_data(ctx, response, case):
    """negative_data_rejection, counting 413 (a body over AM_MAX_BODY_BYTES) as the rejection it is."""
    if response.status_code == 413:
        return True
    return negative_data_rejection(ctx, response, case)


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    rejects_negative_data,
    ignored_auth,
]


@pytest.fixture
def wsgi_in_test_transaction(db):
    """Like Django's test client: requests must not close the test's connection (it holds the transaction)."""
    from django.core import signals
    from django.db import close_old_connections

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def token(wsgi_in_test_transaction, step, workflow_spec) -> str:
    """A submitting agent with common roles, and some data for it to find."""
    _, token = agent_registry.agent_create(name="fuzzer", roles=["developer", "tester"], capacity=3, can_submit=True)
    workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), step("T", role="tester")))
    return token


class SchemaTests:
    def test_the_schema_documents_every_endpoint_and_error(self, client):
        document = client.get("/v1/schema?format=json").json()
        paths = document["paths"]
        for path in ["/v1/tasks/{role}/ready", "/v1/steps/{step_id}/heartbeat", "/v1/report_result",
                     "/v1/workflows", "/v1/workflows/{workflow_id}/status", "/v1/workflows/{workflow_id}/events",
                     "/v1/agents", "/v1/agents/me", "/v1/steps/{step_id}/retry"]:
            assert path in paths, path
        pull = paths["/v1/tasks/{role}/ready"]["get"]["responses"]
        assert {"200", "204", "401", "403", "429"} <= set(pull)
        report = paths["/v1/report_result"]["post"]
        assert "409" in report["responses"] and "requestBody" in report

    def test_the_docs_page_uses_no_cdn(self, client):
        page = client.get("/v1/docs").content.decode()
        assert "swagger-ui" in page and "cdn" not in page.lower()


@schema.parametrize()
# Random locally, to keep finding new cases; the same examples every time under CI, so a failure reproduces.
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=os.environ.get("CI") == "true", print_blob=True)
@pytest.mark.slow
def test_the_api_keeps_to_its_schema(case, token):
    # A long poll or a lock wait adds nothing here but minutes of waiting.
    if case.query and "wait" in case.query:
        case.query["wait"] = 0
    if isinstance(case.body, dict) and isinstance(case.body.get("wait_s"), (int, float)):
        case.body["wait_s"] = 0
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)


class _Stateful:
    """Chained calls: what one operation returns (a workflow, a step, a lock) feeds the next, with a token."""

    token = ""


def _zero_waits(case) -> None:
    if case.query and "wait" in case.query:
        case.query["wait"] = 0
    if isinstance(case.body, dict) and isinstance(case.body.get("wait_s"), (int, float)):
        case.body["wait_s"] = 0


class APIWorkflow(schema.as_state_machine()):
    def before_call(self, case):
        _zero_waits(case)

    def get_call_kwargs(self, case):
        return {"headers": {"Authorization": f"Bearer {_Stateful.token}"}}

    def validate_response(self, response, case, additional_checks=None, **kwargs):
        # The token goes in as explicit headers, so the auth check knows it is a real one (and strips it).
        case.validate_response(response, checks=CHECKS, headers=kwargs.get("headers"), transport_kwargs=kwargs)


@pytest.mark.slow
def test_chained_calls_keep_to_the_schema_and_never_ignore_auth(token):
    """Stateful: sequences of calls linked by the ids they return; no 5xx, no schema violation, auth checked."""
    _Stateful.token = token
    APIWorkflow.run(settings=settings(max_examples=15, stateful_step_count=6, deadline=None,
                                      suppress_health_check=list(HealthCheck),
                                      derandomize=os.environ.get("CI") == "true", print_blob=True))
