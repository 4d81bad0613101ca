"""Bad input gets the right 4xx with {"error", "detail"}, never a 500, and stores nothing."""

import uuid

import pytest
from rest_framework.test import APIClient

from coordination.services import workflow_creation
from coordination.models import Event, Step, Workflow

pytestmark = pytest.mark.django_db


def _raw_post(client: APIClient, url: str, raw: bytes, content_type="application/json"):
    return client.generic("POST", url, raw, content_type=content_type)


def _assert_error(response, status, code):
    assert response.status_code == status, response.content
    body = response.json()
    assert body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    return body


def _stored():
    return Workflow.objects.count(), Step.objects.count(), Event.objects.count()


class BadInputTests:
    def test_malformed_json(self, owner_client):
        before = _stored()
        _assert_error(_raw_post(owner_client, "/v1/workflows", b'{"name": "x", '), 400, "invalid_json")
        assert _stored() == before

    def test_nan_is_not_json(self, developer):
        body = _raw_post(developer.client(), "/v1/report_result",
                         b'{"step_id": "%s", "lease_token": "x", "status": "completed", "execution_time_s": NaN}'
                         % str(uuid.uuid4()).encode())
        _assert_error(body, 400, "invalid_json")

    def test_a_body_that_is_not_an_object(self, owner_client):
        _assert_error(_raw_post(owner_client, "/v1/workflows", b"[1, 2]"), 400, "invalid_request")
        _assert_error(_raw_post(owner_client, "/v1/workflows", b'"text"'), 400, "invalid_request")

    def test_wrong_types(self, owner_client):
        body = _assert_error(owner_client.post("/v1/workflows", {"name": "w", "priority": "high", "steps": "A"},
                                               format="json"), 400, "invalid_request")
        assert "priority" in body["errors"] and "steps" in body["errors"]

    def test_unknown_fields_are_named(self, owner_client, developer):
        body = _assert_error(owner_client.post("/v1/workflows", {"name": "w", "stpes": []}, format="json"),
                             400, "invalid_request")
        assert "stpes" in body["detail"]
        body = _assert_error(
            owner_client.post("/v1/workflows", {"name": "w", "steps": [{"key": "A", "role": "x", "dependson": []}]},
                              format="json"), 400, "invalid_request")
        assert "dependson" in body["detail"]
        body = _assert_error(developer.client().post(
            "/v1/report_result",
            {"step_id": str(uuid.uuid4()), "lease_token": "t", "status": "completed", "reslt": "x"}, format="json"),
            400, "invalid_request")
        assert "reslt" in body["detail"]

    def test_an_invalid_graph_names_its_problems_and_stores_nothing(self, owner_client):
        before = _stored()
        body = _assert_error(owner_client.post("/v1/workflows", {"name": "w", "steps": [
            {"key": "A", "role": "developer", "depends_on": ["B"]},
            {"key": "B", "role": "developer", "depends_on": ["A"]},
        ]}, format="json"), 400, "invalid_workflow")
        assert body["errors"][0]["code"] == "cycle" and body["errors"][0]["cycle"] == ["A", "B", "A"]
        assert _stored() == before

    def test_a_body_over_the_limit_is_413(self, owner_client, settings):
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
        before = _stored()
        payload = {"name": "w", "goal": "x" * 5000}
        _assert_error(owner_client.post("/v1/workflows", payload, format="json"), 413, "too_large")
        assert _stored() == before

    def test_unknown_ids_are_404(self, owner_client, developer):
        missing = uuid.uuid4()
        for url in [f"/v1/workflows/{missing}", f"/v1/workflows/{missing}/status", f"/v1/workflows/{missing}/events",
                    f"/v1/workflows/{missing}/audits", f"/v1/steps/{missing}"]:
            _assert_error(owner_client.get(url), 404, "not_found")
        _assert_error(owner_client.post(f"/v1/workflows/{missing}/cancel"), 404, "not_found")
        _assert_error(developer.client().post(f"/v1/steps/{missing}/heartbeat", {"lease_token": "x"}, format="json"),
                      404, "not_found")
        _assert_error(developer.client().post("/v1/report_result", {"step_id": str(missing), "lease_token": "x",
                                                                    "status": "completed"}, format="json"),
                      404, "not_found")

    def test_malformed_ids_in_the_path_are_404(self, owner_client):
        _assert_error(owner_client.get("/v1/workflows/not-a-uuid"), 404, "not_found")

    def test_a_nul_character_in_json_is_refused_not_a_500(self, owner_client):
        before = _stored()
        response = owner_client.post("/v1/workflows", {"name": "w", "metadata": {"k": "a\x00b"},
                                                       "steps": [{"key": "A", "role": "developer"}]}, format="json")
        _assert_error(response, 400, "invalid_request")
        response = owner_client.post("/v1/workflows", {"name": "w\x00", "steps": [{"key": "A", "role": "developer"}]},
                                     format="json")
        _assert_error(response, 400, "invalid_request")
        assert _stored() == before

    def test_a_wrong_method_is_405(self, owner_client):
        _assert_error(owner_client.delete("/v1/workflows"), 405, "method_not_allowed")

    def test_a_wrong_content_type_is_415(self, owner_client):
        _assert_error(_raw_post(owner_client, "/v1/workflows", b"name=w", "application/x-www-form-urlencoded"),
                      415, "unsupported_media_type")

    def test_a_bad_filter_is_400(self, owner_client):
        _assert_error(owner_client.get("/v1/workflows?status=done"), 400, "invalid_request")
        _assert_error(owner_client.get("/v1/workflows/%s/events?after=x" % uuid.uuid4()), 400, "invalid_request")

    def test_listing_filters_and_paginates(self, owner_client, step, workflow_spec):
        for index in range(3):
            workflow_creation.workflow_create(spec=workflow_spec(step("A"), name=f"w{index}", project="p1" if index else "p2"))
        body = owner_client.get("/v1/workflows?project=p1&limit=1").json()
        assert body["count"] == 2 and len(body["results"]) == 1 and body["next"]
        assert owner_client.get("/v1/workflows?status=running").json()["count"] == 3


class QueryParameterTests:
    def test_a_nul_in_a_query_filter_is_400_not_a_500(self, owner_client, developer):
        _assert_error(owner_client.get("/v1/locks?agent=a%00b"), 400, "invalid_request")
        _assert_error(owner_client.get("/v1/workflows?project=p%00"), 400, "invalid_request")

    def test_an_unknown_query_parameter_is_400(self, owner_client):
        body = _assert_error(owner_client.get("/v1/workflows?stauts=running"), 400, "invalid_request")
        assert "stauts" in body["detail"]

    def test_an_empty_name_filter_is_400_as_an_empty_path_is(self, owner_client):
        # `?project=` names no project: refused like `?path=`, not answered with an empty list.
        for url in ["/v1/locks?project=", "/v1/locks?agent=", "/v1/workflows?project="]:
            body = _assert_error(owner_client.get(url), 400, "invalid_request")
            assert "is empty" in body["detail"], url
        _assert_error(owner_client.get("/v1/locks?path="), 400, "invalid_path")
        assert owner_client.get("/v1/locks?project=default&agent=nobody").json() == {"locks": []}

    def test_a_prefix_over_1024_characters_is_400_on_both_listings(self, owner_client):
        owner_client.post("/v1/projects", {"name": "webapp"}, format="json")
        for url in ["/v1/projects/webapp/files", "/v1/projects/webapp/archive"]:
            _assert_error(owner_client.get(f"{url}?prefix={'a' * 1025}"), 400, "invalid_request")
            assert owner_client.get(f"{url}?prefix={'a' * 1024}").status_code == 200, url

    def test_a_method_the_view_does_not_take_is_405_whatever_the_query(self, owner_client):
        owner_client.post("/v1/projects", {"name": "webapp"}, format="json")
        response = owner_client.generic("TRACE", "/v1/projects/webapp/archive?into=")
        _assert_error(response, 405, "method_not_allowed")


class MoneyTests:
    def test_an_amount_is_rounded_to_its_places_not_refused(self, owner_client):
        # A float sum such as 0.1 + 0.2 has 17 decimal places; a client should not have to round it itself.
        body = owner_client.post("/v1/workflows", {"name": "w", "goal": "g", "budget": {"usd": 0.1 + 0.2}},
                                 format="json")
        assert body.status_code == 202, body.content
        assert body.json()["budget"]["usd"] == 0.3

    def test_an_amount_past_its_bound_is_refused_before_rounding(self, owner_client):
        for usd in [99999999.99995, 1e9, 0.00001]:
            _assert_error(owner_client.post("/v1/workflows", {"name": "w", "goal": "g", "budget": {"usd": usd}},
                                            format="json"), 400, "invalid_request")
        assert owner_client.post("/v1/workflows", {"name": "w", "goal": "g", "budget": {"usd": 99999999.9999}},
                                 format="json").status_code == 202

    def test_a_number_past_a_bigint_is_400_not_a_500(self, owner_client, developer):
        _assert_error(owner_client.post("/v1/workflows", {"name": "w", "goal": "g", "budget": {"tokens": 2**70}},
                                        format="json"), 400, "invalid_request")
        owner_client.post("/v1/projects", {"name": "webapp"}, format="json")
        response = developer.client().put("/v1/projects/webapp/files/a.txt", b"x", content_type="text/plain",
                                          HTTP_X_AM_FENCING=str(2**70))
        _assert_error(response, 400, "invalid_request")
        response = developer.client().post("/v1/projects/webapp/changes",
                                           {"changes": [{"path": "a.txt", "content": "x", "fencing": 2**70}]},
                                           format="json")
        _assert_error(response, 400, "invalid_request")
