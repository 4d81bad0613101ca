"""When Redis (the channel layer) stops answering, pages are told with close code 4503 instead of going stale."""

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from am_project.asgi import application
from coordination.services import workflow_creation
from dashboard.tests.sockets import session_headers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


class LayerOutageTests:
    def test_it_closes_open_pages_with_4503_when_redis_stops_answering(self, owner, monkeypatch, step, workflow_spec):
        from dashboard import consumers

        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), name="Watched"))
        headers = session_headers(owner)
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

    def test_it_refuses_a_page_with_4503_while_redis_is_down(self, owner, monkeypatch, step, workflow_spec):
        from dashboard import consumers

        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A"), name="Refused"))
        headers = session_headers(owner)

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
