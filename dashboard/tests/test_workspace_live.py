"""Open project pages follow the workspace: a write reaches the project's sockets as the tree and file partials."""

import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator

from am_project.asgi import application
from coordination.services import projects, workspace
from dashboard.tests.sockets import receive_until, session_headers

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _write(owner, path: str, content: bytes):
    return workspace.workspace_write(project_name="live", user=owner, changes=[workspace.Change(path, content)])


class ProjectLiveTests:
    def test_it_pushes_the_tree_and_the_open_file_escaped_when_it_changes(self, owner):
        projects.project_create(name="live")
        _write(owner, "a.txt", b"one\n")
        headers = session_headers(owner)

        async def scenario():
            communicator = WebsocketCommunicator(application, "/ws/projects/live/files/a.txt", headers=headers)
            assert (await communicator.connect())[0]
            await sync_to_async(_write)(owner, "a.txt", b"<script>alert(1)</script>\n")
            frame = await receive_until(communicator, 'id="workspace-file" data-version="2"')
            await communicator.disconnect()
            return frame

        frame = async_to_sync(scenario)()
        assert 'id="workspace-tree" data-version="2" hx-swap-oob="true"' in frame
        assert 'id="file-history" hx-swap-oob="true"' in frame and 'id="history-2"' in frame
        assert "<script>alert" not in frame and "&lt;" in frame

    def test_it_pushes_only_the_tree_when_another_file_changes_and_catches_up_on_request(self, owner):
        projects.project_create(name="live")
        _write(owner, "a.txt", b"one\n")
        headers = session_headers(owner)

        async def scenario():
            communicator = WebsocketCommunicator(application, "/ws/projects/live/files/a.txt", headers=headers)
            assert (await communicator.connect())[0]
            await sync_to_async(_write)(owner, "b.txt", b"two\n")
            frame = await receive_until(communicator, 'data-path="b.txt"')
            await communicator.send_to(text_data=json.dumps({"catch_up_after": 0}))
            caught_up = await receive_until(communicator, 'id="workspace-file"')
            await communicator.disconnect()
            return frame, caught_up

        frame, caught_up = async_to_sync(scenario)()
        assert 'id="workspace-file"' not in frame
        assert 'id="workspace-tree"' in caught_up and 'data-path="b.txt"' in caught_up

    def test_it_refuses_a_socket_for_an_unknown_project_or_an_anonymous_one(self, owner):
        headers = session_headers(owner)

        async def scenario():
            unknown = WebsocketCommunicator(application, "/ws/projects/nope/", headers=headers)
            anonymous = WebsocketCommunicator(application, "/ws/projects/nope/", headers=[(b"origin", b"http://localhost")])
            return (await unknown.connect())[0], (await anonymous.connect())[0]

        assert async_to_sync(scenario)() == (False, False)
