"""The SDK's examples (agents/examples/) as their users run them: processes against a real server."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agents.tests.test_worker_live import _wait_for
from coordination.models import Iteration, Step, Workflow, WorkspaceFile
from coordination.services import workflow_creation

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
BASE_DIR = Path(__file__).resolve().parent.parent.parent


class Example:
    def __init__(self, module: str, server: str, agent, tmp_path: Path, **env) -> None:
        environment = {**os.environ, "AM_SERVER": server, "AM_TOKEN": agent.token,
                       "AM_WORKSPACE": str(tmp_path / "ws"), "PYTHONUNBUFFERED": "1", **env}
        environment.pop("DJANGO_SETTINGS_MODULE", None)  # an example needs no server settings
        self.log = tmp_path / f"{module}.log"
        self.handle = open(self.log, "w")
        self.process = subprocess.Popen([sys.executable, "-m", f"agents.examples.{module}"], cwd=BASE_DIR,
                                        env=environment, stdout=self.handle, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            self.handle.close()


class PlainExampleTests:
    def test_the_plain_worker_writes_up_a_workflow_and_fails_an_empty_step(self, live_am, tmp_path, make_agent, step,
                                                                            workflow_spec):
        from agents.client import Client

        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("market", role="writer", description="Who buys note-taking apps."),
            step("users", role="writer", description="What users of note-taking apps ask for."),
            step("summary", "market", "users", role="writer", description="Bring the findings together.",
                 files=(("report.md", "write"),)),
            name="Write-up", project="plain"))
        empty = workflow_creation.workflow_create(spec=workflow_spec(step("empty", role="writer", max_attempts=3),
                                                                     name="Nothing to write", project="plain"))
        agent = make_agent("plain-writer", ["writer"], capacity=2)
        example = Example("plain_worker", live_am, agent, tmp_path)
        try:
            assert _wait_for(lambda: Workflow.objects.get(id=workflow.id).status == "completed"
                             and Workflow.objects.get(id=empty.id).status == "failed", timeout=60), example.output()
        finally:
            assert example.stop() == 0, example.output()
        client = Client(live_am, agent.token)
        report = client.file_bytes("plain", "report.md").decode()
        market = Step.objects.get(workflow=workflow, key="market").results.get().final_result
        assert report.startswith("# Step summary\n\nBring the findings together.") and "## market" in report
        assert market == "Wrote notes/market.md (43 characters)." and market in report
        index = client.file_bytes("plain", "notes/index.md").decode().splitlines()
        # Three steps appended to one file, two of them at once: the lock kept every line.
        assert index[0] == "# Notes" and sorted(index[2:]) == [
            "- [Step market](notes/market.md)", "- [Step summary](report.md)", "- [Step users](notes/users.md)"]
        summary = Step.objects.get(workflow=workflow, key="summary")
        assert summary.outputs == {"path": "report.md"}
        assert list(Iteration.objects.filter(attempt__step=summary).order_by("index")
                    .values_list("action", flat=True)) == ["read inputs", "write report.md", "append notes/index.md"]
        failed = Step.objects.get(workflow=empty, key="empty")
        assert failed.attempts.count() == 1 and "Nothing to write up" in failed.results.get().error
        client.close()


class LangGraphExampleTests:
    def test_the_langgraph_worker_streams_its_nodes_and_writes_the_reviewed_document(
            self, live_am, tmp_path, make_agent, step, workflow_spec):
        pytest.importorskip("langgraph", reason="the LangGraph example needs `pip install langgraph`")
        from agents.client import Client

        workflow = workflow_creation.workflow_create(spec=workflow_spec(
            step("facts", role="analyst", description="Facts about note-taking apps"),
            step("brief", "facts", role="analyst", description="A brief on note-taking apps",
                 files=(("docs/brief.md", "write"),)),
            name="Graph", project="graph"))
        agent = make_agent("graph-writer", ["analyst"])
        example = Example("langgraph_worker", live_am, agent, tmp_path, AM_ROLES="analyst", AM_CONCURRENCY="1")
        try:
            assert _wait_for(lambda: Workflow.objects.get(id=workflow.id).status == "completed", timeout=90), \
                example.output()
        finally:
            assert example.stop() == 0, example.output()
        brief = Step.objects.get(workflow=workflow, key="brief")
        assert brief.outputs == {"path": "docs/brief.md", "sections": ["Summary", "facts", "Next steps"], "rounds": 1}
        assert list(Iteration.objects.filter(attempt__step=brief).order_by("index")
                    .values_list("action", flat=True)) == ["outline", "draft", "review"]
        facts = Step.objects.get(workflow=workflow, key="facts").results.get().final_result
        document = Client(live_am, agent.token).file_bytes("graph", "docs/brief.md").decode()
        assert document.startswith("# A brief on note-taking apps\n") and f"## facts\n\n{facts}\n" in document
