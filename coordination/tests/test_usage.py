"""Token usage and cost, summed per step, workflow and agent from the reports."""

import pytest

from coordination.services import workflow_creation
from coordination.models import Workflow
from coordination.tests.agent_calls import pull, report
from coordination.tests.history import write_finished_steps

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


class KeptAgentUsageTests:
    """An agent's usage is kept as results are stored: reading it never sums the results table."""

    def test_failed_and_retried_reports_count_too_and_the_totals_match_the_results(self, make_agent, owner_client,
                                                                                   step, workflow_spec):
        from django.db.models import Sum

        from coordination.models import AgentUsage, Result

        agent = make_agent("worker", ["developer"], capacity=3)
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B"), step("C")))
        cases = [("completed", {}), ("failed", {"error": "boom", "retryable": True}),
                 ("failed", {"error": "bad", "retryable": False})]
        for index, (status, extra) in enumerate(cases):
            step_id, token = pull(agent)
            response = report(agent, step_id, token, status=status, **extra,
                              usage={"model": "m", "prompt_tokens": 10 * (index + 1), "completion_tokens": index,
                                     "cost_usd": 0.25})
            assert response.status_code == 200, response.content
        usage = AgentUsage.objects.get(agent=agent.agent)
        sums = Result.objects.filter(attempt__agent=agent.agent).aggregate(
            p=Sum("prompt_tokens"), c=Sum("completion_tokens"), usd=Sum("cost_usd"))
        assert (usage.prompt_tokens, usage.completion_tokens, usage.cost_usd) == (sums["p"], sums["c"], sums["usd"])
        assert (usage.steps_completed, usage.steps_failed) == (1, 2)
        me = agent.client().get("/v1/agents/me").json()
        assert me["tokens_used"] == 60 + 3 and me["cost_usd"] == 0.75

    def test_an_agent_with_no_results_reads_zero(self, make_agent):
        agent = make_agent("fresh", ["developer"])
        me = agent.client().get("/v1/agents/me").json()
        assert (me["tokens_used"], me["cost_usd"], me["steps_held"], me["locks_held"]) == (0, 0, 0, 0)

    def test_reading_usage_costs_the_same_queries_and_plan_with_a_large_history(self, make_agent, step,
                                                                                  workflow_spec,
                                                                                  django_assert_num_queries):
        from django.db import connection

        from coordination import selectors

        agent = make_agent("veteran", ["developer"], capacity=2)
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B")))
        step_id, token = pull(agent)
        report(agent, step_id, token, usage={"model": "m", "prompt_tokens": 5, "completion_tokens": 5,
                                             "cost_usd": 0.01})

        def read_me() -> dict:
            return agent.client().get("/v1/agents/me").json()

        # The agent with its load and usage (the token's agent comes from the cache since the pull).
        with django_assert_num_queries(1):
            small = read_me()
        # 20,000 more results of this agent, written straight to the tables (as years of history would be).
        with connection.cursor() as cursor:
            workflow_id = Workflow.objects.values_list("id", flat=True).first()
            write_finished_steps(cursor, workflow_id=workflow_id, agent_id=agent.agent.id, n=20000, role="developer")
            # ... and 20,000 locks it took and released.
            cursor.execute("""
                INSERT INTO coordination_filelock (id, project_id, agent_id, path, mode, fencing, acquired_at,
                                                   expires_at, released_at, release_reason)
                SELECT gen_random_uuid(), p.id, %s, 'old/' || g, 'write', g, now(), now(), now(), 'released'
                FROM generate_series(1, 20000) g, (SELECT id FROM coordination_project LIMIT 1) p
            """, [agent.agent.id])
            cursor.execute("ANALYZE coordination_result; ANALYZE coordination_step; ANALYZE coordination_attempt; "
                           "ANALYZE coordination_filelock")
        with django_assert_num_queries(1):
            large = read_me()
        assert large["tokens_used"] == small["tokens_used"]  # kept totals: rows written around the service don't count
        queryset = selectors.agents_with_load().filter(id=agent.agent.id)
        plan = queryset.explain()
        assert "coordination_result" not in plan and "coordination_attempt" not in plan, plan
        # What it holds is read through the partial indexes of live leases and locks, never the history.
        assert "Seq Scan" not in plan, plan
        assert "step_leased_by" in plan, plan
        assert "lock_live_by_agent" in plan or "lock_live_by_path" in plan, plan
