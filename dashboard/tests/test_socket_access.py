"""Who may open a dashboard socket: a logged-in person from the dashboard's own origin, nobody else."""

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from am_project.asgi import application
from dashboard.tests.sockets import session_headers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


class SocketAccessTests:
    def test_it_refuses_an_anonymous_socket(self):
        async def scenario():
            communicator = WebsocketCommunicator(application, "/ws/overview/",
                                                 headers=[(b"origin", b"http://localhost")])
            connected, code = await communicator.connect()
            return connected, code

        connected, code = async_to_sync(scenario)()
        assert not connected

    def test_it_refuses_a_foreign_origin(self, owner):
        headers = [h for h in session_headers(owner) if h[0] != b"origin"] + [(b"origin", b"http://evil.example")]

        async def scenario():
            communicator = WebsocketCommunicator(application, "/ws/overview/", headers=headers)
            connected, _ = await communicator.connect()
            return connected

        assert async_to_sync(scenario)() is False
