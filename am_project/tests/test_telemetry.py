"""OpenTelemetry is off unless the standard OTEL_* variables ask for it, and costs nothing while off."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured, MiddlewareNotUsed
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from agents import cli, telemetry as worker_telemetry
from am_project import telemetry
from coordination.middleware import tracing
from coordination.services import workflow_creation

BASE_DIR = Path(__file__).resolve().parent.parent.parent

# A server process started without OTEL_*: Django, its request handler, a pull's answer; then what was loaded.
SERVER_OFF = """
import sys
import django
django.setup()
from django.core.handlers.wsgi import WSGIHandler
WSGIHandler()
from am_project import telemetry
from opentelemetry import trace
print(telemetry.tracer is None, type(trace.get_tracer_provider()).__name__,
      any(name.startswith("opentelemetry.sdk") for name in sys.modules))
"""


class TelemetrySwitchTests:
    @pytest.mark.parametrize("environ, wanted", [
        ({}, None),
        ({"OTEL_SERVICE_NAME": "am"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, "otlp"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "console"),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, "otlp"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "otlp"),
    ])
    def test_it_reads_the_standard_variables(self, environ, wanted):
        assert worker_telemetry.traces_wanted(environ) == wanted

    @pytest.mark.parametrize("environ", [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_TRACES_EXPORTER": "otlp,console"},
    ])
    def test_it_refuses_what_it_cannot_do_at_start(self, environ, capsys):
        with pytest.raises(ImproperlyConfigured):
            telemetry.configure(environ, install_global=False)
        assert telemetry.tracer is None
        code = cli.main(["--server", "http://127.0.0.1:1", "--token", "t", "--workspace", "/tmp/x", "--llm",
                         "scripted"], environ=environ)
        assert code == 2 and "OTEL_" in capsys.readouterr().err

    def test_it_stays_off_without_the_variables(self):
        assert telemetry.configure({}, install_global=False) is False
        assert telemetry.tracer is None
        assert worker_telemetry.setup({}) is False and worker_telemetry.tracer is None
        assert not isinstance(trace.get_tracer_provider(), TracerProvider)
        with pytest.raises(MiddlewareNotUsed):
            tracing(lambda request: None)  # Django leaves it out of the chain: no work per request
        with worker_telemetry.step_span(object()) as span, worker_telemetry.llm_call(
                provider="openai", model="m", purpose="act") as call:
            assert span is None and call is None
        assert worker_telemetry.inject({"A": "b"}) == {"A": "b"}

    def test_an_endpoint_turns_on_batched_otlp_export(self):
        try:
            assert telemetry.configure({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, install_global=False)
            processor = telemetry._provider._active_span_processor._span_processors[0]
            assert type(processor).__name__ == "BatchSpanProcessor"
            assert type(processor._batch_processor._exporter).__name__ == "OTLPSpanExporter"
            assert telemetry._provider.resource.attributes["service.name"] == "agentmanager"
        finally:
            telemetry.unconfigure()
        assert telemetry.tracer is None

    @pytest.mark.django_db
    def test_a_lease_names_no_trace_while_off(self, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        answer = developer.client().get("/v1/tasks/developer/ready")
        assert answer.status_code == 200 and answer.json()["lease"]["traceparent"] is None

    @pytest.mark.slow
    def test_a_server_process_without_the_variables_loads_no_sdk(self):
        env = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
        run = subprocess.run([sys.executable, "-c", SERVER_OFF], cwd=BASE_DIR, capture_output=True, text=True,
                             env={**env, "DJANGO_SETTINGS_MODULE": "am_project.settings"}, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["True", "ProxyTracerProvider", "False"]
