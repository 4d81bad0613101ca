"""The admin cannot go around the services: every page of every registered model, whatever is posted.

Pages are driven as a browser would drive them (the form a page renders, posted
back with one field or every field made hostile), on the real database; after
every post the books must still balance. The live push of an edit goes through
the real ASGI application and the Redis channel layer.
"""

import asyncio
import logging
import re
from dataclasses import dataclass
from decimal import Decimal
from html.parser import HTMLParser

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.contrib import admin
from django.contrib.admin.utils import quote
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db.models import Count, Q
from django.test import Client, RequestFactory
from django.urls import reverse

from am_project.asgi import application
from coordination.events import publisher, workflow_group
from coordination.models import (
    Agent,
    Attempt,
    AuditReport,
    Event,
    FileLock,
    Project,
    Result,
    Step,
    StepStatus,
    UserToken,
    Workflow,
)
from coordination.services import audits, pull, reports, tokens, workflow_creation

REGISTERED = list(admin.site._registry)
COORDINATION_MODELS = [model for model in REGISTERED if model._meta.app_label == "coordination"]
# 400 is Django refusing a body too large or malformed before any view runs.
ANSWERS_WITHOUT_ERROR = {200, 302, 400, 403, 404}
# Each field of a page's form gets each of these in turn, the rest of the form as the page rendered it.
HOSTILE_VALUES = [
    "",
    "text with a NUL \x00 inside",
    "x" * 100_000,
    "0",
    "-1",
    "-99999999999999999999999999",
    "99999999999999999999999999999",
    "{not json",
    '[{"path": "../../etc/passwd", "mode": "exclusive"}]',
    "not-a-choice",
]
# Given to every field at once, with the above.
MORE_HOSTILE_VALUES = ["\x00", "1e309", "NaN", '{"path": "src/a.py"}', "on"]
# An inline's rows after the first are like the first.
LATER_INLINE_ROW = re.compile(r"^.+-[1-9][0-9]*-.+$")


def _label(model) -> str:
    return model._meta.label


@pytest.fixture
def staff(db):
    """A superuser; without a password, as hashing one costs more than most of these tests."""
    return get_user_model().objects.create_user(username="ops", is_staff=True, is_superuser=True)


@pytest.fixture
def person(db):
    """A person with an API token (not staff)."""
    return get_user_model().objects.create_user(username="owner")


@pytest.fixture
def staff_client(staff) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@dataclass
class World:
    """One of everything the admin shows: a finished workflow and a live one with a running step."""

    done: Workflow
    live: Workflow
    running: Step
    pending: Step
    ready: Step
    token: UserToken
    group: Group
    person: object
    other_ids: tuple[str, ...]

    def target(self, model):
        """The row whose change and delete pages are driven (never the staff user posting)."""
        chosen = {
            Project: self.live.project,
            Agent: self.running.lease_agent,
            Workflow: self.live,
            Step: self.running,
            Attempt: Attempt.objects.filter(step=self.running).first(),
            Result: Result.objects.first(),
            AuditReport: AuditReport.objects.first(),
            FileLock: FileLock.objects.filter(step=self.running).first(),
            Event: Event.objects.filter(workflow=self.live).first(),
            UserToken: self.token,
            Group: self.group,
            get_user_model(): self.person,
        }
        return chosen.get(model) or model._default_manager.first()


@pytest.fixture
def world(developer, person, step, workflow_spec) -> World:
    done = workflow_creation.workflow_create(spec=workflow_spec(step("X"), name="Done"))
    lease = pull.step_pull(agent=developer.agent, roles=["developer"])
    reports.step_report(step_id=lease.step.id, agent=developer.agent, lease_token=lease.token,
                        outcome=reports.Outcome(status="completed", final_result="done"))
    audits.audit_record(workflow_id=done.id, findings=audits.AuditFindings(
        successful=True, feedback="All checks pass.", rework_suggestions=[], confidence=0.9, criteria=[],
        checks=[], steps_reviewed=["X"], reviewer="checks"))
    live = workflow_creation.workflow_create(spec=workflow_spec(
        step("A", files=(("src/a.py", "write"),), priority=5), step("B", "A"), step("C"), name="Live"))
    pull.step_pull(agent=developer.agent, roles=["developer"])
    tokens.user_token_create(user=person, name="ci")
    done.refresh_from_db()
    assert done.status == "completed"
    pending, ready = Step.objects.get(workflow=live, key="B"), Step.objects.get(workflow=live, key="C")
    return World(
        done=done, live=live, running=Step.objects.get(workflow=live, key="A", status=StepStatus.IN_PROGRESS),
        pending=pending, ready=ready, token=UserToken.objects.get(user=person),
        group=Group.objects.create(name="operators"), person=person,
        # Ids of rows other than the ones posted to, as values of any field: a UUID and an integer first.
        other_ids=(str(done.id), str(person.pk), str(pending.id), str(ready.id),
                   str(Event.objects.filter(workflow=done).first().id), str(done.project_id)),
    )


class _BrowserForm(HTMLParser):
    """What a browser would post from a page: its inputs, textareas and selections (the logout form aside)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fields: dict[str, list[str]] = {}
        self._in_form = False
        self._textarea: list[str] | None = None
        self._select: str | None = None

    def _add(self, name: str, value: str) -> None:
        self.fields.setdefault(name, []).append(value)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "form":
            self._in_form = not (attrs.get("action") or "").endswith("/logout/")
        if not self._in_form or not attrs.get("name") and tag != "option":
            return
        if tag == "input":
            kind = attrs.get("type", "text")
            if kind in ("submit", "button", "image", "reset", "file"):
                return
            if kind in ("checkbox", "radio") and "checked" not in attrs:
                return
            self._add(attrs["name"], attrs.get("value") or ("on" if kind in ("checkbox", "radio") else ""))
        elif tag == "textarea":
            self._textarea = [attrs["name"], ""]
        elif tag == "select":
            self._select = attrs["name"]
        elif tag == "option" and self._select and "selected" in attrs:
            self._add(self._select, attrs.get("value", ""))

    def handle_endtag(self, tag):
        if tag == "form":
            self._in_form = False
        elif tag == "textarea" and self._textarea:
            name, text = self._textarea
            self._add(name, text[1:] if text.startswith("\n") else text)  # as browsers read it
            self._textarea = None
        elif tag == "select":
            self._select = None

    def handle_data(self, data):
        if self._textarea is not None:
            self._textarea[1] += data


def _browser_form(response) -> dict[str, list[str]]:
    parser = _BrowserForm()
    parser.feed(response.content.decode())
    return parser.fields


def _assert_books_balance(where: str) -> None:
    """Each workflow's counters equal its steps by status and sum to its total; every running step holds a lease."""
    actual: dict = {}
    rows = Step.objects.order_by().values("workflow_id", "status").annotate(n=Count("id"))
    for row in rows:
        actual.setdefault(row["workflow_id"], {})[row["status"]] = row["n"]
    for workflow in Workflow.objects.all():
        counts = actual.get(workflow.id, {})
        assert workflow.counts == {status: counts.get(status, 0) for status in StepStatus.values}, where
        assert workflow.total_steps == sum(counts.values()), where
    unleased = Step.objects.filter(status=StepStatus.IN_PROGRESS).filter(
        Q(lease_agent=None) | Q(lease_expires_at=None) | Q(lease_token_hash="") | Q(lease_attempt=None)
        | Q(lease_attempt__ended_at__isnull=False))
    assert not unleased.exists(), where


def _request(client: Client, method: str, url: str, data=None):
    summary = {name: (values[0][:40] if values else "") for name, values in (data or {}).items()}
    try:
        response = client.get(url) if method == "GET" else client.post(url, data or {})
    except Exception as exc:  # noqa: BLE001 - name the request that broke the page
        raise AssertionError(f"{method} {url} {summary} raised {type(exc).__name__}: {exc}") from exc
    assert response.status_code in ANSWERS_WITHOUT_ERROR, f"{method} {url} {summary}: {response.status_code}"
    if method == "POST":
        _assert_books_balance(f"after POST {url} {summary}")
    return response


def _posts(form: dict[str, list[str]], model, other_ids: tuple[str, ...]) -> list[dict[str, list[str]]]:
    """Empty; the page's own form; each of its fields made hostile in turn; the page's form with the fields
    it does not show (every model field, the admin's buttons) added; everything hostile at once."""
    fields = [name for name in form if name != "csrfmiddlewaretoken"]
    unshown = {name for field in model._meta.concrete_fields for name in (field.name, field.attname)}
    unshown |= {"_saveasnew", "_continue", "_addanother", "post"}
    posts = [{}, dict(form)]
    for name in fields:
        if not LATER_INLINE_ROW.match(name):
            posts += [{**form, name: [value]} for value in [*HOSTILE_VALUES, *other_ids[:2]]]
    for value in [*other_ids, "", "\x00", "-1", "99999999999999999999999999999", "not-a-choice"]:
        posts.append({**form, **{name: [value] for name in unshown}})
    for value in [*HOSTILE_VALUES, *MORE_HOSTILE_VALUES]:
        posts.append({name: [value] for name in {*fields, *unshown}})
    return posts


def _page_urls(model, obj) -> list[str]:
    app, name = model._meta.app_label, model._meta.model_name
    pk = quote(obj.pk) if obj is not None else "00000000-0000-0000-0000-000000000000"
    return [reverse(f"admin:{app}_{name}_add"), reverse(f"admin:{app}_{name}_change", args=[pk]),
            reverse(f"admin:{app}_{name}_delete", args=[pk])]


@pytest.fixture
def quiet_refusals():
    """Refusals (4xx) are what these tests provoke by the thousand: log only server errors meanwhile."""
    loggers = {logging.getLogger("django.request"): logging.ERROR,
               logging.getLogger("django.security"): logging.CRITICAL}
    levels = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    yield
    for logger, level in levels.items():
        logger.setLevel(level)


@pytest.mark.slow
@pytest.mark.usefixtures("quiet_refusals")
class AdminPageTests:
    @pytest.mark.parametrize("model", REGISTERED, ids=_label)
    def test_it_never_answers_500_on_add_change_and_delete_pages(self, staff_client, world, model):
        for url in _page_urls(model, world.target(model)):
            page = _request(staff_client, "GET", url)
            form = _browser_form(page) if page.status_code == 200 else {}
            for data in _posts(form, model, world.other_ids):
                _request(staff_client, "POST", url, data)

    @pytest.mark.parametrize("model", COORDINATION_MODELS, ids=_label)
    def test_it_never_answers_500_on_list_actions(self, staff, staff_client, world, model):
        model_admin = admin.site._registry[model]
        request = RequestFactory().get("/admin/")
        request.user = staff
        url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")
        target = str(world.target(model).pk)
        for action in [*model_admin.get_actions(request), "delete_selected", "not-an-action"]:
            for selected in [[target], *([value] for value in [*HOSTILE_VALUES, *world.other_ids])]:
                _request(staff_client, "POST", url, {"action": action, "index": "0", "_selected_action": selected})
            _request(staff_client, "POST", url, {"action": action, "index": "0", "select_across": "1",
                                                 "_selected_action": [target], "post": "yes"})


class AdminGuardTests:
    @pytest.mark.parametrize("model", COORDINATION_MODELS, ids=_label)
    def test_it_reaches_no_model_save_or_delete_of_its_own(self, staff, model):
        """A new registration that may write must say how (a service), or fail here."""
        model_admin = admin.site._registry[model]
        request = RequestFactory().get("/admin/")
        request.user = staff
        cls = type(model_admin)
        if model_admin.has_add_permission(request) or model_admin.has_change_permission(request):
            assert cls.save_model is not admin.ModelAdmin.save_model, f"{cls.__name__}.save_model"
            assert cls.save_related is not admin.ModelAdmin.save_related, f"{cls.__name__}.save_related"
        if model_admin.has_delete_permission(request):
            assert cls.delete_model is not admin.ModelAdmin.delete_model, f"{cls.__name__}.delete_model"
            assert cls.delete_queryset is not admin.ModelAdmin.delete_queryset, f"{cls.__name__}.delete_queryset"
        else:
            assert "delete_selected" not in model_admin.get_actions(request)
        for inline_class in model_admin.inlines:
            inline = inline_class(model, admin.site)
            assert not inline.has_add_permission(request, None), inline_class.__name__
            assert not inline.has_change_permission(request), inline_class.__name__
            assert not inline.has_delete_permission(request), inline_class.__name__

    @pytest.mark.parametrize("model_name", ["step", "attempt", "result", "auditreport", "filelock", "event",
                                            "agent", "workflow", "usertoken"])
    def test_it_has_no_add_form_for_rows_that_only_services_create(self, staff_client, model_name):
        assert staff_client.get(f"/admin/coordination/{model_name}/add/").status_code == 403
        assert staff_client.post(f"/admin/coordination/{model_name}/add/", {"name": "x"}).status_code == 403

    def test_it_creates_and_describes_a_project_through_the_service(self, staff_client, db):
        response = staff_client.post("/admin/coordination/project/add/", {"name": "shop", "description": "The shop"})
        assert response.status_code == 302
        project = Project.objects.get(name="shop")
        assert Event.objects.filter(kind="project.created", data__project="shop").exists()
        staff_client.post(f"/admin/coordination/project/{project.id}/change/", {"name": "renamed",
                                                                                "description": "The web shop"})
        project.refresh_from_db()
        assert (project.name, project.description) == ("shop", "The web shop")
        assert Event.objects.filter(kind="project.updated", data__project="shop").exists()


def _change_url(obj) -> str:
    return reverse(f"admin:coordination_{obj._meta.model_name}_change", args=[obj.pk])


def _edit(client: Client, obj, **changes):
    """Post the object's change form as the page renders it, with some fields changed."""
    form = _browser_form(client.get(_change_url(obj)))
    return client.post(_change_url(obj), {**form, **{name: [value] for name, value in changes.items()}},
                       follow=True)


class StepEditTests:
    def test_it_edits_descriptive_fields_and_records_the_change(self, staff_client, world):
        response = _edit(staff_client, world.pending, name="Write the tests", priority="7", max_attempts="5",
                         lease_ttl_s="300", files='[{"path": "./src//b.py", "mode": "read"}]')
        assert response.status_code == 200 and "was changed successfully" in response.content.decode()
        world.pending.refresh_from_db()
        assert (world.pending.name, world.pending.priority, world.pending.max_attempts,
                world.pending.lease_ttl_s) == ("Write the tests", 7, 5, 300)
        assert world.pending.files == [{"path": "src/b.py", "mode": "read"}]
        event = Event.objects.get(kind="step.edited", step_id=world.pending.id)
        assert event.data["by_user"] == "ops" and set(event.data["changed"]) == {
            "name", "priority", "max_attempts", "lease_ttl_s", "files"}

    def test_it_refuses_the_files_of_a_running_step_and_changes_nothing(self, staff_client, world):
        before = Step.objects.get(id=world.running.id)
        response = _edit(staff_client, world.running, description="Also touch b.py",
                         files='[{"path": "src/b.py", "mode": "write"}]')
        assert response.status_code == 200 and "is running and holds locks" in response.content.decode()
        after = Step.objects.get(id=world.running.id)
        assert (after.files, after.description, after.updated_at) == (before.files, before.description,
                                                                      before.updated_at)
        assert not Event.objects.filter(kind="step.edited").exists()

    @pytest.mark.parametrize("field, value", [
        ("name", ""), ("name", "x" * 201), ("description", "nul \x00"), ("priority", "10000001"),
        ("priority", "-99999999999999"), ("max_attempts", "0"), ("max_attempts", "101"), ("lease_ttl_s", "1"),
        ("files", "{not json"), ("files", '[{"path": "../etc/passwd", "mode": "write"}]'),
        ("files", '[{"path": "src/a.py", "mode": "exclusive"}]'), ("files", '"src/a.py"'),
    ])
    def test_it_shows_a_bad_value_on_the_form_and_changes_nothing(self, staff_client, world, field, value):
        before = Step.objects.get(id=world.pending.id)
        response = _edit(staff_client, world.pending, **{field: value})
        html = response.content.decode()
        assert response.status_code == 200 and "errorlist" in html and "was changed successfully" not in html
        assert Step.objects.get(id=world.pending.id).updated_at == before.updated_at
        assert not Event.objects.filter(kind="step.edited").exists()

    def test_it_ignores_posted_fields_that_only_the_work_changes(self, staff_client, world):
        response = _edit(staff_client, world.running, status="completed", attempt="0", lease_agent="",
                         workflow=str(world.done.id), key="Z", role="writer", final_result="forged",
                         workflow_priority="99", description="Read the brief.")
        assert response.status_code == 200
        running = Step.objects.get(id=world.running.id)
        assert (running.status, running.attempt, running.workflow_id, running.key, running.role,
                running.final_result, running.workflow_priority) == (
            "in_progress", 1, world.live.id, "A", "developer", "", 0)
        assert running.description == "Read the brief."
        _assert_books_balance("after a forged step post")


def _session_headers(user) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    client.get("/accounts/login/")  # sets the CSRF cookie too
    cookies = "; ".join(f"{name}={morsel.value}" for name, morsel in client.cookies.items())
    return [(b"cookie", cookies.encode()), (b"origin", b"http://localhost"), (b"host", b"localhost")]


async def _receive_until(communicator, needle: str, timeout: float = 5.0) -> str:
    seen = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            raise AssertionError(f"{needle!r} not received; got {len(seen)} frame(s): {[f[:200] for f in seen]}")
        frame = await communicator.receive_from(timeout=remaining)
        seen.append(frame)
        if needle in frame:
            return frame


async def _receive_kind(layer, channel: str, kind: str) -> dict:
    while True:
        message = await layer.receive(channel)
        if message.get("event", {}).get("kind") == kind:
            return message


@pytest.mark.django_db(transaction=True)
class StepEditLiveTests:
    def test_it_pushes_an_edited_description_to_the_workflows_group_and_dashboard(self, staff, staff_client, world):
        url = _change_url(world.pending)
        form = {**_browser_form(staff_client.get(url)), "description": ["Read the brief twice."]}
        headers = _session_headers(staff)
        publisher.flush()  # the events of the world's making are out before the group is joined

        async def scenario():
            layer = get_channel_layer()
            channel = await layer.new_channel()
            await layer.group_add(workflow_group(world.live.id), channel)
            dashboard = WebsocketCommunicator(application, f"/ws/workflows/{world.live.id}/", headers=headers)
            assert (await dashboard.connect())[0]
            response = await sync_to_async(staff_client.post)(url, form)
            message = await asyncio.wait_for(_receive_kind(layer, channel, "step.edited"), timeout=5)
            frame = await _receive_until(dashboard, '<span class="kind">step.edited</span>')
            await dashboard.disconnect()
            await layer.group_discard(workflow_group(world.live.id), channel)
            return response, message, frame

        response, message, frame = async_to_sync(scenario)()
        assert response.status_code == 302
        assert message["type"] == "am.event" and message["event"]["kind"] == "step.edited"
        assert message["event"]["step_id"] == str(world.pending.id)
        assert message["event"]["data"]["changed"] == {"description": "21 characters"}
        assert Event.objects.filter(id=message["event"]["id"], kind="step.edited", step_id=world.pending.id).exists()
        assert "<b>B</b>" in frame
        assert Step.objects.get(id=world.pending.id).description == "Read the brief twice."


class DeletionTests:
    def test_it_cannot_delete_a_step_one_by_one_or_in_bulk(self, staff_client, world):
        url = reverse("admin:coordination_step_delete", args=[world.pending.id])
        assert staff_client.get(url).status_code == 403
        assert staff_client.post(url, {"post": "yes"}).status_code == 403
        staff_client.post("/admin/coordination/step/", {"action": "delete_selected", "index": "0", "post": "yes",
                                                       "_selected_action": [str(world.pending.id)]})
        assert Step.objects.filter(id=world.pending.id).exists()
        world.live.refresh_from_db()
        assert world.live.total_steps == 3
        _assert_books_balance("after trying to delete a step")

    def test_it_deletes_a_finished_workflow_through_the_service(self, staff_client, world):
        url = reverse("admin:coordination_workflow_delete", args=[world.done.id])
        assert staff_client.get(url).status_code == 200
        response = staff_client.post(url, {"post": "yes"})
        assert response.status_code == 302
        assert not Workflow.objects.filter(id=world.done.id).exists()
        assert not Step.objects.filter(workflow_id=world.done.id).exists()
        event = Event.objects.get(kind="workflow.deleted")
        assert event.data["workflow_id"] == str(world.done.id) and event.data["by_user"] == "ops"

    def test_it_refuses_to_delete_a_live_workflow_with_a_message(self, staff_client, world):
        url = reverse("admin:coordination_workflow_delete", args=[world.live.id])
        response = staff_client.post(url, {"post": "yes"}, follow=True)
        assert "cancel it before deleting it" in response.content.decode()
        assert response.redirect_chain[0][0] == _change_url(world.live)
        assert Workflow.objects.filter(id=world.live.id).exists()
        assert Step.objects.filter(workflow=world.live).count() == 3
        assert not Event.objects.filter(kind="workflow.deleted").exists()

    def test_it_deletes_in_bulk_the_finished_workflows_and_names_the_live_ones(self, staff_client, world):
        response = staff_client.post("/admin/coordination/workflow/", {
            "action": "delete_selected", "index": "0", "post": "yes",
            "_selected_action": [str(world.done.id), str(world.live.id)]}, follow=True)
        html = response.content.decode()
        assert "Deleted: 1." in html and "cancel it before deleting it" in html
        assert list(Workflow.objects.values_list("id", flat=True)) == [world.live.id]
        assert Event.objects.filter(kind="workflow.deleted").count() == 1
        _assert_books_balance("after a bulk delete")

    def test_it_revokes_a_persons_token_through_the_service(self, staff_client, world):
        url = reverse("admin:coordination_usertoken_delete", args=[world.token.id])
        assert staff_client.post(url, {"post": "yes"}).status_code == 302
        assert not UserToken.objects.exists()
        assert Event.objects.filter(kind="user_token.revoked", data__name="ci", data__by_user="ops").exists()


class EditThroughServicesTests:
    def test_it_edits_a_workflow_through_the_service(self, staff_client, world):
        response = _edit(staff_client, world.live, name="Live, renamed", priority="3", budget_usd="12.5",
                         max_rework_rounds="2", status="cancelled", total_steps="0", n_ready="9")
        assert "was changed successfully" in response.content.decode()
        live = Workflow.objects.get(id=world.live.id)
        assert (live.name, live.priority, live.budget_usd, live.max_rework_rounds, live.status) == (
            "Live, renamed", 3, Decimal("12.5"), 2, "running")
        assert set(Step.objects.filter(workflow=live).values_list("workflow_priority", flat=True)) == {3}
        assert Event.objects.filter(kind="workflow.edited", workflow=live).exists()
        _assert_books_balance("after a workflow edit")

    def test_it_shows_a_refused_workflow_edit_and_changes_nothing(self, staff_client, world):
        response = _edit(staff_client, world.live, max_rework_rounds="11")
        assert "out of range 0..10" in response.content.decode()
        assert Workflow.objects.get(id=world.live.id).max_rework_rounds == 1
        assert not Event.objects.filter(kind="workflow.edited").exists()

    def test_it_edits_an_agent_through_the_service_and_refuses_bad_roles(self, staff_client, world):
        agent = world.running.lease_agent
        response = _edit(staff_client, agent, roles="developer,reviewer", capacity="3")
        assert "was changed successfully" in response.content.decode()
        agent.refresh_from_db()
        assert (agent.roles, agent.capacity) == (["developer", "reviewer"], 3)
        assert Event.objects.filter(kind="agent.updated", agent=agent).exists()
        response = _edit(staff_client, agent, roles="human")
        assert "approval steps" in response.content.decode()
        agent.refresh_from_db()
        assert agent.roles == ["developer", "reviewer"]
        response = _edit(staff_client, agent, capacity="5000")
        assert "at most 1000" in response.content.decode()
        agent.refresh_from_db()
        assert agent.capacity == 3

    def test_it_keeps_the_lock_release_action(self, staff_client, world):
        lock = FileLock.objects.get(step=world.running)
        staff_client.post("/admin/coordination/filelock/", {"action": "release_locks", "index": "0",
                                                           "_selected_action": [str(lock.id)]})
        lock.refresh_from_db()
        assert lock.release_reason == "forced"
        assert Event.objects.filter(kind="locks.released").last().data["locks"][0]["path"] == "src/a.py"
