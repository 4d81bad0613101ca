"""Open pages follow the work live: what the API changes reaches the subscribed sockets as partials."""

import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator

from am_project.asgi import application
from coordination.models import Event, Step
from coordination.services import pull, workflow_creation
from dashboard.tests.sockets import receive_until, session_headers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


class LiveUpdateTests:
    def test_it_brings_a_report_through_the_api_to_a_subscribed_workflow_page(self, owner, developer, step,
                                                                              workflow_spec):
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), name="Live"))
        body = developer.client().get("/v1/tasks/developer/ready").json()
        step_id = body["step"]["id"]
        headers = session_headers(owner)

        async def scenario():
            communicator = WebsocketCommunicator(application, f"/ws/workflows/{workflow.id}/", headers=headers)
            connected, _ = await communicator.connect()
            assert connected
            report = await sync_to_async(developer.client().post)(
                "/v1/report_result", {"step_id": step_id, "lease_token": body["lease"]["token"],
                                      "status": "completed", "final_result": "done"}, format="json")
            assert report.status_code == 200
            frame = await receive_until(communicator, f'id="step-{step_id}" data-status="completed"')
            await communicator.disconnect()
            return frame

        frame = async_to_sync(scenario)()
        b = Step.objects.get(workflow=workflow, key="B")
        assert f'id="step-{b.id}" data-status="ready"' in frame  # the released dependent too
        assert 'id="workflow-header"' in frame and "hx-swap-oob" in frame
        assert 'name="csrfmiddlewaretoken"' in frame  # pushed forms still post

    def test_it_grows_the_step_pages_thread_with_heartbeat_iterations(self, owner, developer, step, workflow_spec):
        workflow_creation.workflow_create(spec=workflow_spec(step("A"), name="Thread"))
        lease = pull.step_pull(agent=developer.agent, roles=["developer"])
        headers = session_headers(owner)

        async def scenario():
            communicator = WebsocketCommunicator(application, f"/ws/steps/{lease.step.id}/", headers=headers)
            assert (await communicator.connect())[0]
            await sync_to_async(developer.client().post)(
                f"/v1/steps/{lease.step.id}/heartbeat",
                {"lease_token": lease.token, "iterations": [{"iteration": 1, "thought": "Plan the outline",
                                                             "action": "list_files", "observation": "empty"}]},
                format="json")
            frame = await receive_until(communicator, "Plan the outline")
            await communicator.disconnect()
            return frame

        frame = async_to_sync(scenario)()
        assert 'hx-swap-oob="beforeend:#thread"' in frame

    def test_it_brings_new_workflows_to_the_overview_and_catches_up_after_a_reconnect(self, owner, step,
                                                                                      workflow_spec):
        headers = session_headers(owner)

        async def scenario():
            communicator = WebsocketCommunicator(application, "/ws/overview/", headers=headers)
            assert (await communicator.connect())[0]
            workflow = await sync_to_async(workflow_creation.workflow_create)(spec=workflow_spec(step("A"), name="Fresh"))
            frame = await receive_until(communicator, f'id="workflow-{workflow.id}"')
            await communicator.send_to(text_data=json.dumps({"catch_up_after": 0}))
            refresh = await receive_until(communicator, 'id="workflow-rows" hx-swap-oob="true"')
            await communicator.disconnect()
            return frame, refresh

        frame, refresh = async_to_sync(scenario)()
        assert 'afterbegin:#workflow-rows' in frame and "Fresh" in refresh

    def test_it_renders_once_for_the_sockets_of_a_page_each_with_its_own_csrf_token(self, owner, developer,
                                                                                    monkeypatch, step, workflow_spec):
        from django.contrib.auth import get_user_model

        from dashboard import consumers, live

        other = get_user_model().objects.create_user("second-viewer", password="x")  # not staff, as owner
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), step("B", "A"), name="Shared"))
        body = developer.client().get("/v1/tasks/developer/ready").json()
        step_id = body["step"]["id"]
        headers = [session_headers(owner), session_headers(other)]
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
            frames = [await receive_until(s, f'id="step-{step_id}" data-status="completed"') for s in sockets]
            for socket in sockets:
                await socket.disconnect()
            return frames

        frames = async_to_sync(scenario)()
        completed_event = Event.objects.get(workflow=workflow, kind="step.completed")
        assert renders.count(completed_event.id) == 1  # one render for both sockets
        for frame, token, foreign in zip(frames, tokens, reversed(tokens)):
            assert f'name="csrfmiddlewaretoken" value="{token}"' in frame
            assert foreign not in frame and consumers.CSRF_MARKER not in frame
