import pytest

from coordination import health

pytestmark = pytest.mark.django_db


class HealthzTests:
    def test_it_answers_200_with_both_versions(self, client):
        response = client.get("/healthz")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok"
        assert body["database"]["ok"] and body["database"]["version"][:2].isdigit()
        assert body["redis"]["ok"] and body["redis"]["version"][0].isdigit()
        assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]

    def test_it_answers_503_naming_redis_when_redis_is_down(self, client, settings, tmp_path):
        settings.REDIS_URL = f"unix://{tmp_path}/nothing-here.sock"
        health._redis_client.cache_clear()
        try:
            response = client.get("/healthz")
        finally:
            health._redis_client.cache_clear()
        assert response.status_code == 503
        body = response.json()
        assert body["error"] == "unavailable"
        assert body["down"] == ["Redis"]
        assert "Redis" in body["detail"]
        assert body["database"]["ok"] is True


class MetricsTests:
    def test_it_exposes_step_and_workflow_counts_as_prometheus_text(self, client, step, workflow_spec):
        from coordination.services import workflow_creation

        workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A")))
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/plain")
        text = response.content.decode()
        assert 'am_steps{status="ready"} 1.0' in text
        assert 'am_steps{status="pending"} 1.0' in text
        assert 'am_workflows{status="running"} 1.0' in text
        assert "process_resident_memory_bytes" in text


def test_every_response_says_how_long_the_server_took(client, db):
    response = client.get("/healthz")
    name, _, duration = response["Server-Timing"].partition(";dur=")
    assert name == "app" and float(duration) >= 0
