"""The planner and the auditor, with the server's LLM pointed at a local chat-completions server."""

import pytest

from agents.llm.base import Usage
from coordination import tasks
from coordination.services import leases, pull, reports, workflow_creation, workflow_specs
from coordination.models import AuditReport, Step, Workflow

pytestmark = pytest.mark.django_db

GOOD_PLAN = {"steps": [
    {"key": "research", "name": "Research", "role": "researcher", "description": "Find out", "depends_on": [],
     "files": [{"path": "notes.md", "mode": "write"}]},
    {"key": "write", "name": "Write", "role": "writer", "description": "Write it up", "depends_on": ["research"]},
]}


@pytest.fixture
def server_llm(settings, fake_llm):
    settings.AM_LLM = "openai"
    settings.AM_LLM_BASE_URL = fake_llm.base_url
    settings.AM_LLM_MODEL = "planner-model"
    settings.AM_LLM_API_KEY = "k"
    return fake_llm


@pytest.fixture
def team(make_agent):
    make_agent("researcher-1", ["researcher"])
    make_agent("writer-1", ["writer"])


def _goal() -> Workflow:
    workflow = workflow_creation.workflow_create(spec=workflow_specs.WorkflowSpec(name="Goal", goal="Explain fencing tokens"))
    assert workflow.status == "planning"
    return workflow


class PlannerTests:
    def test_a_goal_is_accepted_with_202(self, owner_client, team):
        response = owner_client.post("/v1/workflows", {"name": "G", "goal": "Write a report"}, format="json")
        assert response.status_code == 202
        assert response.json()["status"] == "planning" and response.json()["steps"] == []

    def test_a_valid_plan_becomes_the_steps(self, server_llm, team):
        workflow = _goal()
        server_llm.reply_json(GOOD_PLAN)
        assert tasks.plan_workflow(str(workflow.id)) == "planned"
        workflow.refresh_from_db()
        assert workflow.status == "running" and workflow.total_steps == 2
        assert dict(Step.objects.filter(workflow=workflow).values_list("key", "status")) == {
            "research": "ready", "write": "pending"}
        prompt = server_llm.requests[0]["messages"][1]["content"]
        assert "researcher" in prompt and "writer" in prompt and "Explain fencing tokens" in prompt

    def test_an_invalid_plan_is_repaired_with_the_problems(self, server_llm, team):
        workflow = _goal()
        cyclic = {"steps": [{"key": "a", "name": "A", "role": "researcher", "depends_on": ["b"]},
                            {"key": "b", "name": "B", "role": "wizard", "depends_on": ["a"]}]}
        server_llm.reply_json(cyclic)
        server_llm.reply_json(GOOD_PLAN)
        assert tasks.plan_workflow(str(workflow.id)) == "planned"
        retry_prompt = server_llm.requests[1]["messages"][-2]["content"]
        assert "wizard" in retry_prompt
        workflow.refresh_from_db()
        assert workflow.status == "running"

    def test_an_invalid_plan_twice_fails_the_workflow_with_the_reason(self, server_llm, team):
        workflow = _goal()
        bad = {"steps": [{"key": "a", "name": "A", "role": "researcher", "depends_on": ["a"]}]}
        server_llm.reply_json(bad)
        server_llm.reply_json(bad)
        assert tasks.plan_workflow(str(workflow.id)) == "failed"
        workflow.refresh_from_db()
        assert workflow.status == "failed"
        assert "depends on itself" in workflow.failure_reason
        assert workflow.events.filter(kind="workflow.failed").exists()

    def test_without_an_llm_planning_fails_saying_how_to_fix_it(self, settings, team):
        settings.AM_LLM = "none"
        workflow = _goal()
        tasks.plan_workflow(str(workflow.id))
        workflow.refresh_from_db()
        assert workflow.status == "failed" and "AM_LLM" in workflow.failure_reason


def _complete(workflow, agent, results: dict[str, str]) -> None:
    while True:
        lease = pull.step_pull(agent=agent.agent, roles=["developer"])
        if not isinstance(lease, pull.Lease):
            return
        reports.step_report(step_id=lease.step.id, agent=agent.agent, lease_token=lease.token,
                             outcome=reports.Outcome(status="completed", final_result=results[lease.step.key]))


class AuditTests:
    def test_a_good_workflow_passes_and_gets_a_synthesis(self, settings, developer, step, workflow_spec):
        settings.AM_LLM = "none"
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), name="Good", goal="Ship it"))
        _complete(workflow, developer, {"A": "part one", "B": "part two"})
        workflow.refresh_from_db()
        assert workflow.status == "completed" and workflow.audit_status == "pending"
        assert tasks.audit_workflow(str(workflow.id)) == "passed"
        workflow.refresh_from_db()
        report = AuditReport.objects.get(workflow=workflow)
        assert report.successful and report.reviewer == "checks"
        assert {c["name"] for c in report.checks} >= {"results_present", "failures_and_retries", "writes_locked",
                                                      "durations", "usage"}
        assert workflow.audit_status == "passed"
        assert "part one" in workflow.synthesis and workflow.synthesis.index("part one") < workflow.synthesis.index("part two")

    def test_a_failed_audit_sends_steps_back_for_one_round_then_passes(self, server_llm, developer, owner_client, step,
                                                                       workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("A"), step("B", "A"), step("C"), name="Weak", goal="Ship it", max_rework_rounds=1))
        _complete(workflow, developer, {"A": "solid", "B": "thin", "C": "fine"})
        server_llm.reply_json({"successful": False, "feedback": "B lacks evidence.",
                               "rework_suggestions": [{"step": "A", "reason": "Cite sources."}],
                               "confidence": 0.8, "criteria": ["evidence"]})
        assert tasks.audit_workflow(str(workflow.id)) == "failed"
        workflow.refresh_from_db()
        assert workflow.status == "running" and workflow.rework_round == 1 and workflow.audit_status == "failed"
        statuses = dict(Step.objects.filter(workflow=workflow).values_list("key", "status"))
        assert statuses == {"A": "ready", "B": "pending", "C": "completed"}
        lease = pull.step_pull(agent=developer.agent, roles=["developer"])
        assert lease.step.key == "A"
        assert lease.inputs["_audit"]["feedback"] == "B lacks evidence."
        assert lease.inputs["_audit"]["reason"] == "Cite sources."
        assert lease.inputs["_audit"]["previous_result"] == "solid"
        reports.step_report(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token,
                             outcome=reports.Outcome(status="completed", final_result="solid, with sources"))
        _complete(workflow, developer, {"B": "thick"})
        workflow.refresh_from_db()
        assert workflow.status == "completed"
        server_llm.reply_json({"successful": True, "feedback": "Good now.", "rework_suggestions": [],
                               "confidence": 0.9, "criteria": ["evidence"]})
        server_llm.reply_json({"synthesis": "Shipped, with sources."})
        assert tasks.audit_workflow(str(workflow.id)) == "passed"
        workflow.refresh_from_db()
        assert workflow.audit_status == "passed" and workflow.synthesis == "Shipped, with sources."
        audits = owner_client.get(f"/v1/workflows/{workflow.id}/audits").json()
        assert [a["successful"] for a in audits] == [True, False]
        assert [a["round"] for a in audits] == [1, 0]
        assert owner_client.get(f"/v1/workflows/{workflow.id}").json()["synthesis"] == "Shipped, with sources."

    def test_rework_rounds_are_bounded(self, server_llm, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), name="W", max_rework_rounds=0))
        _complete(workflow, developer, {"A": "x"})
        server_llm.reply_json({"successful": False, "feedback": "no", "confidence": 0.5,
                               "rework_suggestions": [{"step": "A", "reason": "again"}]})
        server_llm.reply_json({"synthesis": "s"})
        tasks.audit_workflow(str(workflow.id))
        workflow.refresh_from_db()
        assert workflow.status == "completed" and workflow.audit_status == "failed" and workflow.rework_round == 0

    def test_an_audit_can_be_requested(self, owner_client, developer, step, workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), name="W"))
        assert owner_client.post(f"/v1/workflows/{workflow.id}/audits").status_code == 409
        _complete(workflow, developer, {"A": "x"})
        response = owner_client.post(f"/v1/workflows/{workflow.id}/audits")
        assert response.status_code == 202 and response.json()["audit_status"] == "pending"


class BudgetTests:
    def test_reaching_the_budget_pauses_the_workflow_and_tells_agents(self, developer, owner_client, step,
                                                                      workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B"), step("C", "A"), name="B",
                                                               budget_tokens=100))
        first = pull.step_pull(agent=developer.agent, roles=["developer"])
        second = pull.step_pull(agent=developer.agent, roles=["developer"])
        answer = reports.step_report(step_id=first.step.id, agent=developer.agent, lease_token=first.token,
                                      outcome=reports.Outcome(status="completed", final_result="x",
                                                               usage=Usage(prompt_tokens=80, completion_tokens=30)))
        assert answer["workflow_status"] == "paused"
        workflow.refresh_from_db()
        assert workflow.status == "paused" and workflow.paused_reason == "budget: used 110 of 100 tokens"
        beat = leases.step_heartbeat(step_id=second.step.id, agent=developer.agent, lease_token=second.token)
        assert beat["cancel"] is True
        status = owner_client.get(f"/v1/workflows/{workflow.id}/status").json()
        assert status["spent"] == {"usd": 0.0, "tokens": 110} and status["budget"]["tokens"] == 100
        assert isinstance(pull.step_pull(agent=developer.agent, roles=["developer"]), pull.PullMiss)
