"""The dashboard's sockets, through Channels' WebsocketCommunicator on the real ASGI app and Redis layer."""

import asyncio
import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from am_project.asgi import application
from coordination.services import pull, workflow_creation
from coordination.models import Step
from coordination.tests.factories import step, workflow_spec

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


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


class ConsumerTests:
    def test_a_report_through_the_api_reaches_a_subscribed_workflow_page(self, owner, developer):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), name="Live"))
        body = developer.client().get("/v1/tasks/developer/ready").json()
        step_id = body["step"]["id"]
        headers = _session_headers(owner)

        async def scenario():
            communicator = WebsocketCommunicator(application, f"/ws/workflows/{workflow.id}/", headers=headers)
            connected, _ = await communicator.connect()
            assert connected
            report = await sync_to_async(developer.client().post)(
                "/v1/report_result", {"step_id": step_id, "lease_token": body["lease"]["token"],
                                      "status": "completed", "final_result": "done"}, format="json")
            assert report.status_code == 200
            frame = await _receive_until(communicator, f'id="step-{step_id}" data-status="completed"')
            await communicator.disconnect()
            return frame

        frame = async_to_sync(scenario)()
        b = Step.objects.get(workflow=workflow, key="B")
        assert f'id="step-{b.id}" data-status="ready"' in frame  # the released dependent too
        assert 'id="workflow-header"' in frame and "hx-swap-oob" in frame
        assert 'name="csrfmiddlewaretoken"' in frame  # pushed forms still post

    def test_heartbeat_iterations_grow_the_step_pages_thread(self, owner, developer):
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), name="Thread"))
        lease = pull.step_pull(agent=developer.agent, roles=["developer"])
        headers = _session_headers(owner)

        async def scenario():
            communicator = WebsocketCommunicator(application, f"/ws/steps/{lease.step.id}/", headers=headers)
            assert (await communicator.connect())[0]
            await sync_to_async(developer.client().post)(
                f"/v1/steps/{lease.step.id}/heartbeat",
                {"lease_token": lease.token, "iterations": [{"iteration": 1, "thought": "Plan the outline",
                                                             "action": "list_files", "observation": "empty"}]},
                format="json")
            frame = await _receive_until(communicator, "Plan the outline")
            await communicator.disconnect()
            return frame

        frame = async_to_sync(scenario)()
        assert 'hx-swap-oob="beforeend:#thread"' in frame

    def test_the_overview_gets_new_workflows_and_catches_up_after_a_reconnect(self, owner):
        headers = _session_headers(owner)

        async def scenario():
            communicator = WebsocketCommunicator(application, "/ws/overview/", headers=headers)
            assert (await communicator.connect())[0]
            workflow = await sync_to_async(workflow_creation.workflow_create)(spec=workflow_spec(step("A"), name="Fresh"))
            frame = await _receive_until(communicator, f'id="workflow-{workflow.id}"')
            await communicator.send_to(text_data=json.dumps({"catch_up_after": 0}))
            refresh = await _receive_until(communicator, 'id="workflow-rows" hx-swap-oob="true"')
            await communicator.disconnect()
            return frame, refresh

        frame, refresh = async_to_sync(scenario)()
        assert 'afterbegin:#workflow-rows' in frame and "Fresh" in refresh

    def test_an_anonymous_socket_is_refused(self):
        async def scenario():
            communicator = WebsocketCommunicator(application, "/ws/overview/",
                                                 headers=[(b"origin", b"http://localhost")])
            connected, code = await communicator.connect()
            return connected, code

        connected, code = async_to_sync(scenario)()
        assert not connected

    def test_a_foreign_origin_is_refused(self, owner):
        headers = [h for h in _session_headers(owner) if h[0] != b"origin"] + [(b"origin", b"http://evil.example")]

        async def scenario():
            communicator = WebsocketCommunicator(application, "/ws/overview/", headers=headers)
            connected, _ = await communicator.connect()
            return connected

        assert async_to_sync(scenario)() is False


class SharedRenderTests:
    def test_sockets_on_one_page_share_one_render_and_each_gets_its_own_csrf_token(self, owner, developer,
                                                                                    monkeypatch):
        from django.contrib.auth import get_user_model

        from dashboard import consumers, live

        other = get_user_model().objects.create_user("second-viewer", password="x")  # not staff, as owner
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), name="Shared"))
        body = developer.client().get("/v1/tasks/developer/ready").json()
        step_id = body["step"]["id"]
        headers = [_session_headers(owner), _session_headers(other)]
        tokens = [dict(part.split("=", 1) for part in dict(h)[b"cookie"].decode().split("; "))["csrftoken"]
                  for h in headers]
        assert tokens[0] != tokens[1]
        renders = []
        real = live.workflow
        monkeypatch.setattr(live, "workflow", lambda *args: renders.append(args[1]) or real(*args))

        async def scenario():
            sockets = [WebsocketCommunicator(application, f"/ws/workflows/{workflow.id}/", headers=h) for h in headers]
            for socket in sockets:
                assert (await socket.connect())[0]
            report = await sync_to_async(developer.client().post)(
                "/v1/report_result", {"step_id": step_id, "lease_token": body["lease"]["token"],
                                      "status": "completed"}, format="json")
            assert report.status_code == 200
            frames = [await _receive_until(s, f'id="step-{step_id}" data-status="completed"') for s in sockets]
            for socket in sockets:
                await socket.disconnect()
            return frames

        frames = async_to_sync(scenario)()
        completed_event = Event.objects.get(workflow=workflow, kind="step.completed")
        assert renders.count(completed_event.id) == 1  # one render for both sockets
        for frame, token, foreign in zip(frames, tokens, reversed(tokens)):
            assert f'name="csrfmiddlewaretoken" value="{token}"' in frame
            assert foreign not in frame and consumers.CSRF_MARKER not in frame


class LayerDownTests:
    def test_open_pages_are_closed_with_4503_when_redis_stops_answering(self, owner, monkeypatch):
        from dashboard import consumers

        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), name="Watched"))
        headers = _session_headers(owner)
        monkeypatch.setattr(consumers, "PING_S", 0.05)

        async def failing_ping():
            raise ConnectionError("Redis is down")

        async def scenario():
            communicator = WebsocketCommunicator(application, f"/ws/workflows/{workflow.id}/", headers=headers)
            assert (await communicator.connect())[0]
            monkeypatch.setattr(consumers, "_ping_layer", failing_ping)
            closed = await communicator.receive_output(timeout=5)
            await communicator.wait()
            return closed

        closed = async_to_sync(scenario)()
        assert closed == {"type": "websocket.close", "code": consumers.CLOSE_LAYER_DOWN}

    def test_a_page_is_refused_with_4503_while_redis_is_down(self, owner, monkeypatch):
        from dashboard import consumers

        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), name="Refused"))
        headers = _session_headers(owner)

        async def failing_group_add(self, group, channel):
            raise ConnectionError("Redis is down")

        async def scenario():
            communicator = WebsocketCommunicator(application, f"/ws/workflows/{workflow.id}/", headers=headers)
            connected, code = await communicator.connect()
            return connected, code

        from channels_redis.pubsub import RedisPubSubLoopLayer

        monkeypatch.setattr(RedisPubSubLoopLayer, "group_add", failing_group_add)
        connected, code = async_to_sync(scenario)()
        assert not connected and code == consumers.CLOSE_LAYER_DOWN
