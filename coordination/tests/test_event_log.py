"""A workflow's event log over the API: in order, numbered upwards, paged."""

import pytest

from coordination.services import workflow_creation
from coordination.tests.agent_calls import pull, report

pytestmark = pytest.mark.django_db


class EventLogTests:
    def test_it_orders_and_pages_the_events(self, developer, owner_client, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A")))
        step_id, token = pull(developer)
        report(developer, step_id, token)
        body = owner_client.get(f"/v1/workflows/{workflow.id}/events").json()
        kinds = [e["kind"] for e in body["events"]]
        assert kinds == ["workflow.created", "step.leased", "step.completed", "steps.released"]
        seqs = [e["seq"] for e in body["events"]]
        assert seqs == sorted(set(seqs)) and body["last_seq"] == seqs[-1]
        after = owner_client.get(f"/v1/workflows/{workflow.id}/events?after={seqs[1]}&limit=1").json()
        assert [e["seq"] for e in after["events"]] == [seqs[2]] and after["has_more"] is True
        assert after["last_seq"] == seqs[2]
