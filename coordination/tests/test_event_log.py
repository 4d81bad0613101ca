"""A workflow's event log over the API: in order, numbered without gaps, paged."""

import pytest

from coordination.models import Workflow
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
        assert [e["seq"] for e in body["events"]] == [1, 2, 3, 4]
        after = owner_client.get(f"/v1/workflows/{workflow.id}/events?after=2&limit=1").json()
        assert [e["seq"] for e in after["events"]] == [3] and after["has_more"] is True
        assert Workflow.objects.get(id=workflow.id).event_seq == 4
