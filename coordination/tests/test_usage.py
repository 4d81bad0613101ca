"""Token usage and cost, summed per step, workflow and agent from the reports."""

import pytest

from coordination.services import workflow_creation
from coordination.tests.agent_calls import pull, report

pytestmark = pytest.mark.django_db


class UsageTests:
    def test_it_sums_usage_per_step_workflow_and_agent(self, developer, other_developer, owner_client, step,
                                                        workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        for agent, tokens in ((developer, (100, 20)), (other_developer, (7, 3))):
            step_id, token = pull(agent)
            report(agent, step_id, token, usage={"model": "m", "prompt_tokens": tokens[0],
                                                "completion_tokens": tokens[1], "cost_usd": 0.5})
        workflow.refresh_from_db()
        assert workflow.spent_tokens == 130 and float(workflow.spent_usd) == 1.0
        agents = {a["name"]: a for a in owner_client.get("/v1/agents").json()}
        assert agents["dev-1"]["tokens_used"] == 120 and agents["dev-2"]["tokens_used"] == 10
        assert agents["dev-1"]["cost_usd"] == 0.5
