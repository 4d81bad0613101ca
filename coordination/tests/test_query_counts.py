"""The work per report and per status call does not grow with the workflow's size."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from coordination.services import workflow_creation

pytestmark = pytest.mark.django_db


def _report_queries(make_agent, role: str, spec) -> int:
    """Queries of one report through the API, on a workflow of its own role."""
    workflow = workflow_creation.workflow_create(spec=spec)
    client = make_agent(f"agent-{role}", [role]).client()
    body = client.get(f"/v1/tasks/{role}/ready").json()
    payload = {"step_id": body["step"]["id"], "lease_token": body["lease"]["token"], "status": "completed",
               "final_result": "ok", "iterations": [{"iteration": 1, "thought": "t", "action": "a", "observation": "o"}],
               "usage": {"model": "m", "prompt_tokens": 1, "completion_tokens": 1, "cost_usd": 0.001}}
    with CaptureQueriesContext(connection) as queries:
        response = client.post("/v1/report_result", payload, format="json")
    assert response.status_code == 200
    assert response.json()["released"] == sorted(step.key for step in spec.steps if step.depends_on == (spec.steps[0].key,))
    workflow.refresh_from_db()
    assert workflow.n_completed == 1
    return len(queries)


def _status_queries(owner_client, spec) -> int:
    workflow = workflow_creation.workflow_create(spec=spec)
    with CaptureQueriesContext(connection) as queries:
        response = owner_client.get(f"/v1/workflows/{workflow.id}/status")
    assert response.status_code == 200 and response.json()["total_steps"] == len(spec.steps)
    return len(queries)


def _pull_queries(agent, spec) -> int:
    workflow_creation.workflow_create(spec=spec)
    role = spec.steps[0].role
    with CaptureQueriesContext(connection) as queries:
        response = agent.client().get(f"/v1/tasks/{role}/ready")
    assert response.status_code == 200
    return len(queries)


class QueryCountTests:
    def test_a_report_costs_the_same_for_10_and_5000_steps(self, make_agent, chain):
        small = _report_queries(make_agent, "small", chain(10, role="small"))
        large = _report_queries(make_agent, "large", chain(5000, role="large"))
        assert small == large, (small, large)
        assert small <= 20

    def test_releasing_many_dependents_takes_no_more_queries(self, make_agent, chain, fan):
        # The root of a fan releases 3,000 leaves in the same single UPDATE that releases one.
        narrow = _report_queries(make_agent, "narrow", chain(10, role="narrow"))
        wide = _report_queries(make_agent, "wide", fan(3000, role="wide"))
        assert wide == narrow

    def test_a_status_call_costs_the_same_for_10_and_5000_steps(self, owner_client, chain):
        assert _status_queries(owner_client, chain(10)) == _status_queries(owner_client, chain(5000))

    def test_a_pull_costs_the_same_for_10_and_5000_steps(self, make_agent, chain):
        small = _pull_queries(make_agent("p1", ["small"]), chain(10, role="small"))
        large = _pull_queries(make_agent("p2", ["large"]), chain(5000, role="large"))
        assert small == large
