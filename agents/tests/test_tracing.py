"""One step worked with OpenTelemetry on, server and worker in this process, spans caught in memory.

The API runs over real HTTP (a WSGI server in a thread, built once tracing is
on, as a server process started with OTEL_* would be); the worker is the real
runtime with the OpenAI provider against the fake LLM endpoint.
"""

import threading
from decimal import Decimal

import pytest
from django.core.handlers.wsgi import WSGIHandler
from django.core.servers.basehttp import ThreadedWSGIServer, WSGIRequestHandler
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from agents import telemetry as worker_telemetry
from agents.llm.openai_provider import OpenAIProvider
from agents.runtime import WorkerConfig, build_worker
from am_project import telemetry
from coordination.models import Attempt, Workflow
from coordination.services import workflow_creation

pytestmark = pytest.mark.django_db(transaction=True)


class QuietHandler(WSGIRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def server_spans():
    exporter = InMemorySpanExporter()
    telemetry.configure({}, exporter=exporter, install_global=False)
    yield exporter
    telemetry.unconfigure()


@pytest.fixture
def worker_spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "am-worker"}), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    worker_telemetry.use_provider(provider)
    yield exporter
    worker_telemetry.use_provider(None)
    provider.shutdown()


@pytest.fixture
def traced_server(server_spans):
    """The API over HTTP in this process, its middleware loaded with tracing on: its base URL."""
    server = ThreadedWSGIServer(("127.0.0.1", 0), QuietHandler, allow_reuse_address=False)
    server.set_app(WSGIHandler())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def _ns(moment) -> int:
    return int(moment.timestamp() * 1_000_000) * 1000


class TracingTests:
    def test_one_worked_step_reads_as_one_tree_under_its_workflow(
            self, traced_server, server_spans, worker_spans, fake_llm, make_agent, step, workflow_spec, tmp_path):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("scope", role="researcher"),
                                                                        name="Traced"))
        agent = make_agent("traced-1", ["researcher"])
        fake_llm.reply_json({"thought": "Look first.", "action": {"tool": "list_files", "args": {"path": "."}}},
                            prompt_tokens=100, completion_tokens=20)
        fake_llm.reply_json({"thought": "Done.", "action": {"tool": "finish", "args": {"result": "scoped"}}},
                            prompt_tokens=150, completion_tokens=10)
        llm = OpenAIProvider(base_url=fake_llm.base_url, model="test-model", max_retries=0,
                             price_prompt_per_mtok=1.0, price_completion_per_mtok=2.0)
        worker = build_worker(WorkerConfig(server=traced_server, token=agent.token, roles=["researcher"],
                                           workspace=tmp_path / "mirrors", poll_wait_s=1), llm)
        worker.run(max_steps=1)

        workflow.refresh_from_db()
        assert workflow.status == "completed" and worker.completed == 1
        attempt = Attempt.objects.get(step__workflow=workflow)
        trace_id = workflow.id.int  # one trace per workflow, named by it

        server = server_spans.get_finished_spans()
        [root] = [s for s in server if s.name == "workflow"]
        assert root.parent is None and root.context.trace_id == trace_id
        assert root.attributes["am.workflow.id"] == str(workflow.id)
        assert root.attributes["am.workflow.status"] == "completed"
        assert (root.start_time, root.end_time) == (_ns(workflow.created_at), _ns(workflow.finished_at))

        [attempt_span] = [s for s in server if s.name == "attempt researcher"]
        assert attempt_span.context.trace_id == trace_id
        assert attempt_span.parent.span_id == root.context.span_id
        assert dict(attempt_span.attributes) == {
            "am.workflow.id": str(workflow.id), "am.step.id": str(attempt.step_id), "am.step.key": "scope",
            "am.step.role": "researcher", "am.agent.name": "traced-1", "am.attempt": 1,
            "am.attempt.id": str(attempt.id), "am.outcome": "completed",
        }
        # From the lease to the report, though these were two requests.
        assert (attempt_span.start_time, attempt_span.end_time) == (_ns(attempt.started_at), _ns(attempt.ended_at))

        requests = [s for s in server if s.kind == SpanKind.SERVER]
        pull = next(s for s in requests if s.attributes["http.route"] == "v1/tasks/<str:role>/ready")
        assert pull.name == "GET v1/tasks/<str:role>/ready"
        assert pull.attributes["http.request.method"] == "GET"
        assert pull.attributes["http.response.status_code"] == 200
        assert pull.attributes["am.agent.name"] == "traced-1"
        report = next(s for s in requests if s.attributes["http.route"] == "v1/report_result")

        worker_side = worker_spans.get_finished_spans()
        [step_span] = [s for s in worker_side if s.name == "step researcher"]
        # The lease's traceparent made the worker's step span the child of the server's attempt span.
        assert step_span.context.trace_id == trace_id
        assert step_span.parent.span_id == attempt_span.context.span_id and step_span.parent.is_remote
        assert step_span.attributes["am.step.id"] == str(attempt.step_id)
        assert step_span.attributes["am.attempt"] == 1
        assert step_span.attributes["am.outcome"] == "completed"
        # The worker's requests under the step carry its context: the server's spans for them join the tree.
        assert report.context.trace_id == trace_id and report.parent.span_id == step_span.context.span_id

        calls = [s for s in worker_side if s.name == "chat test-model"]
        assert len(calls) == 2
        for call in calls:
            assert call.kind == SpanKind.CLIENT and call.status.status_code != StatusCode.ERROR
            assert call.context.trace_id == trace_id and call.parent.span_id == step_span.context.span_id
            assert call.attributes["gen_ai.operation.name"] == "chat"
            assert call.attributes["gen_ai.provider.name"] == "openai"
            assert call.attributes["gen_ai.request.model"] == "test-model"
            assert call.attributes["gen_ai.response.model"] == "test-model"
            assert call.attributes["am.llm.purpose"] == "act"
            assert call.attributes["server.address"] == "127.0.0.1"
        first, second = sorted(calls, key=lambda s: s.start_time)
        assert (first.attributes["gen_ai.usage.input_tokens"], first.attributes["gen_ai.usage.output_tokens"]) \
            == (100, 20)
        assert first.attributes["am.llm.cost_usd"] == pytest.approx(100 * 1e-6 + 20 * 2e-6)
        assert second.attributes["gen_ai.usage.input_tokens"] == 150
        # What the spans count is what the step reported.
        assert Workflow.objects.get(id=workflow.id).spent_tokens == 280
        assert attempt.result.cost_usd == Decimal("0.000310")
        assert sum(c.attributes["am.llm.cost_usd"] for c in calls) == pytest.approx(float(attempt.result.cost_usd))

    def test_a_failed_llm_call_marks_its_span_failed(self, worker_spans, fake_llm):
        fake_llm.reply_status(400, "bad request")
        llm = OpenAIProvider(base_url=fake_llm.base_url, model="test-model", max_retries=0)
        with pytest.raises(Exception):
            llm.complete_json([{"role": "user", "content": "hi"}], {"type": "object"}, purpose="act")
        [call] = worker_spans.get_finished_spans()
        assert call.status.status_code == StatusCode.ERROR
        assert call.attributes["error.type"] == "BadRequestError"
