"""The OpenAPI schema is complete and the API keeps to it, checked by schemathesis."""

import os
import re

import pytest
import schemathesis
from django.db import transaction
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate as validate_openapi
from schemathesis.checks import CHECKS as REGISTRY, is_check_class, load_all_checks, negative_data_rejection, positive_data_acceptance

from am_project.wsgi import application
from coordination.api.schema import HOLDS_NUL, NO_NUL, NOT_BLANK
from coordination.api.workspace_views import ARCHIVE_KINDS
from coordination.services import agent_registry, workflow_creation

schema = schemathesis.openapi.from_wsgi("/v1/schema", application)
# Archive uploads are bytes on the wire, like a file's body.
for _archive_type in set(ARCHIVE_KINDS) - {"application/octet-stream"}:
    schemathesis.serializer.alias(_archive_type, "application/octet-stream")

# Every built-in check (what `st run --checks all` runs), taken before ours are registered.
load_all_checks()
BUILT_IN = [check for check in REGISTRY.get_all() if not is_check_class(check)]

# What the server refuses on purpose though the schema cannot say it, each with its reason; every such
# refusal is still described in the schema's text. Rules between fields that OpenAPI 3.0 can say (steps or a
# goal, step_id with lease_token, exactly one of content / content_b64 / delete) are in the schema instead.
# (operation or None for any, error code, words of the detail or errors, or a field of the answer)
REFUSED_ON_PURPOSE = [
    # A graph's rules relate one item of `steps` to the others: depends_on naming a key that is no step, a
    # duplicate key, a self-dependency, a cycle. JSON Schema has no way to compare items with each other.
    ("POST /v1/workflows", "invalid_workflow", ""),
    # One change per path in a batch: a rule between items (by one field, once normalised), which JSON Schema's
    # uniqueItems (whole items, as sent) cannot say.
    ("POST /v1/projects/{project}/changes", "invalid_request", "appears twice in one batch"),
    # NUL anywhere in a free-form object (metadata, outputs): PostgreSQL's jsonb cannot store it. OpenAPI 3.0
    # cannot constrain an object's keys (propertyNames is 3.1), and its values only with a recursive schema that
    # would make every client type these objects as a tree of unions; the field's description says it.
    (None, "invalid_request", "NUL character (\\u0000), which cannot be stored"),
    # The body of an import must be a well-formed archive of safe members: `format: binary` says "bytes", and
    # nothing in OpenAPI says "a tar.gz whose member names are relative paths". Refusals of a member name it.
    ("POST /v1/projects/{project}/archive", "invalid_request", ""),
    ("POST /v1/projects/{project}/archive", "invalid_path", "member"),
    # A workspace version not reached yet: the bound is the server's state, which a schema cannot hold.
    (None, "invalid_request", "is out of range: the workspace of"),
]


def _refused_on_purpose(case, response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    text = f"{body.get('detail', '')} {body.get('errors', '')}"
    return any(operation in (None, case.operation.label) and body.get("error") == code
               and (words in text or words in body)
               for operation, code, words in REFUSED_ON_PURPOSE)


@schemathesis.check
def rejects_negative_data(ctx, response, case):
    """negative_data_rejection, counting 413 (a body over AM_MAX_BODY_BYTES) as the rejection it is, and judging
    the headers as sent: the test's token replaces a generated Authorization header, negated ones included, so a
    case whose other negation does not reach the wire (an extra query parameter whose value is an empty list)
    is not counted as "missing Authorization, accepted"."""
    if response.status_code == 413:
        return True
    sent = response.request.headers.get("Authorization")
    generated = case.headers
    if sent:
        case.headers = {**(generated or {}), "Authorization": sent if isinstance(sent, str) else sent[0]}
    try:
        return negative_data_rejection(ctx, response, case)
    finally:
        case.headers = generated


@schemathesis.check
def accepts_positive_data(ctx, response, case):
    """positive_data_acceptance, but for the refusals of REFUSED_ON_PURPOSE."""
    if response.status_code == 400 and _refused_on_purpose(case, response):
        return True
    return positive_data_acceptance(ctx, response, case)


_REPLACED = {negative_data_rejection: rejects_negative_data, positive_data_acceptance: accepts_positive_data}
# Every built-in check, as `st run --checks all` runs them.
CHECKS = [_REPLACED.get(check, check) for check in BUILT_IN]


@pytest.fixture
def wsgi_in_test_transaction(db):
    """Like Django's test client: requests must not close the test's connection (it holds the transaction)."""
    from django.core import signals
    from django.db import close_old_connections

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def token(wsgi_in_test_transaction, step, workflow_spec) -> str:
    """A submitting agent with common roles, and some data for it to find."""
    _, token = agent_registry.agent_create(name="fuzzer", roles=["developer", "tester"], capacity=3, can_submit=True)
    workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), step("T", role="tester")))
    return token


class SchemaTests:
    def test_the_schema_documents_every_endpoint_and_error(self, client):
        document = client.get("/v1/schema?format=json").json()
        paths = document["paths"]
        for path in ["/v1/tasks/{role}/ready", "/v1/steps/{step_id}/heartbeat", "/v1/report_result",
                     "/v1/workflows", "/v1/workflows/{workflow_id}/status", "/v1/workflows/{workflow_id}/events",
                     "/v1/agents", "/v1/agents/me", "/v1/steps/{step_id}/retry"]:
            assert path in paths, path
        pull = paths["/v1/tasks/{role}/ready"]["get"]["responses"]
        assert {"200", "204", "401", "403", "429"} <= set(pull)
        report = paths["/v1/report_result"]["post"]
        assert "409" in report["responses"] and "requestBody" in report

    def test_the_schema_is_valid_openapi(self, client):
        document = client.get("/v1/schema?format=json").json()
        validate_openapi(document)

    def test_strict_bodies_refuse_unknown_fields_and_every_operation_documents_413_and_503(self, client):
        document = client.get("/v1/schema?format=json").json()
        for name in ["LockRenewInRequest", "LeaseTokenInRequest", "HeartbeatInRequest", "ChangeInRequest"]:
            assert document["components"]["schemas"][name]["additionalProperties"] is False, name
        for path, item in document["paths"].items():
            for method, operation in item.items():
                assert "503" in operation["responses"], (method, path)
                if method in ("post", "put"):
                    assert "413" in operation["responses"], (method, path)

    def test_rules_between_fields_and_parameter_limits_are_stated(self, client):
        document = client.get("/v1/schema?format=json").json()
        schemas, paths = document["components"]["schemas"], document["paths"]
        assert {"required": ["step_id", "lease_token"]} in schemas["LockInRequest"]["anyOf"]
        assert len(schemas["ChangeInRequest"]["oneOf"]) == 3
        assert len(schemas["WorkflowInRequest"]["anyOf"]) == 2
        # Text fields refuse NUL (and, where trimmed and not blank, whitespace alone).
        assert schemas["HeartbeatInRequest"]["properties"]["lease_token"]["pattern"] == NOT_BLANK
        assert schemas["IterationRequest"]["properties"]["thought"]["not"] == {"pattern": HOLDS_NUL}
        archive = paths["/v1/projects/{project}/archive"]["post"]
        assert archive["requestBody"]["required"] is True
        assert set(archive["requestBody"]["content"]) == set(ARCHIVE_KINDS)

        def parameter(path, method, name):
            return next(p for p in paths[path][method]["parameters"] if p["name"] == name)["schema"]

        assert parameter("/v1/projects/{project}/archive", "post", "into")["maxLength"] == 1024
        assert parameter("/v1/projects/{project}/files", "get", "prefix")["maxLength"] == 1024
        assert parameter("/v1/projects/{project}/archive", "get", "prefix")["maxLength"] == 1024
        assert parameter("/v1/tasks/{role}/ready", "get", "Idempotency-Key")["maxLength"] == 200
        assert parameter("/v1/locks", "get", "project")["minLength"] == 1
        assert parameter("/v1/locks", "get", "agent")["minLength"] == 1
        assert parameter("/v1/locks", "get", "agent")["pattern"] == NO_NUL

    def test_the_docs_page_uses_no_cdn(self, client):
        """Every script, style and image of the page comes from this server (it works offline). Judged by the
        page's URLs, not its text: its random CSRF token once contained the letters 'cdn'."""
        import re

        page = client.get("/v1/docs").content.decode()
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", page)
        assert "swagger-ui" in page and urls
        assert not [url for url in urls if url.startswith(("http:", "https:", "//"))], urls


def _zero_waits(case) -> None:
    """A long poll or a lock wait adds nothing here but minutes of waiting: a valid one becomes 0. Anything else
    is left as generated (a negative or a string is a negated value, which the server must refuse)."""
    if case.query and _is_wait(case.query.get("wait")):
        case.query["wait"] = 0
    if isinstance(case.body, dict) and _is_wait(case.body.get("wait_s")):
        case.body["wait_s"] = 0


def _is_wait(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 30


@schema.parametrize()
# Random locally, to keep finding new cases; the same examples every time under CI, so a failure reproduces.
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=os.environ.get("CI") == "true", print_blob=True)
@pytest.mark.slow
def test_the_api_keeps_to_its_schema(case, token):
    _zero_waits(case)
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=CHECKS)


class _Stateful:
    """Chained calls: what one operation returns (a workflow, a step, a lock) feeds the next, with a token."""

    token = ""


class APIWorkflow(schema.as_state_machine()):
    def setup(self):
        # Each scenario starts from the same data: which calls are possible depends on what earlier ones
        # returned, and hypothesis replays scenarios (to explore, and to report one), so a scenario that met the
        # rows an earlier one left would draw differently (FlakyStrategyDefinition instead of a result).
        self._savepoint = transaction.savepoint()

    def teardown(self):
        transaction.savepoint_rollback(self._savepoint)

    def before_call(self, case):
        _zero_waits(case)

    def get_call_kwargs(self, case):
        return {"headers": {"Authorization": f"Bearer {_Stateful.token}"}}

    def validate_response(self, response, case, additional_checks=None, **kwargs):
        # The token goes in as explicit headers, so the auth check knows it is a real one (and strips it).
        case.validate_response(response, checks=CHECKS, headers=kwargs.get("headers"), transport_kwargs=kwargs)


@pytest.mark.slow
def test_chained_calls_keep_to_the_schema_and_never_ignore_auth(token):
    """Stateful: sequences of calls linked by the ids they return; no 5xx, no schema violation, auth checked."""
    _Stateful.token = token
    APIWorkflow.run(settings=settings(max_examples=15, stateful_step_count=6, deadline=None,
                                      suppress_health_check=list(HealthCheck),
                                      derandomize=os.environ.get("CI") == "true", print_blob=True))


def test_not_blank_refuses_what_drf_strips_under_an_ecmascript_regex_too():
    """Schemathesis found a token of whitespace that Python strips but ECMAScript's `\\s` does not cover: the
    schema called it valid and the API answered 400 blank."""
    ecma_space = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
    as_ecmascript = re.compile(NOT_BLANK.replace(r"\s", ecma_space))
    stripped = [chr(i) for i in range(0x110000) if chr(i).isspace()]
    assert stripped and not [c for c in stripped if as_ecmascript.fullmatch(c)]
    assert as_ecmascript.fullmatch(" token ") and re.fullmatch(NOT_BLANK, " token ")
