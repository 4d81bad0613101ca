"""A logged-in person's WebSocket, for Channels' WebsocketCommunicator on the real ASGI app and Redis layer."""

import asyncio

from django.test import Client


def session_headers(user) -> list[tuple[bytes, bytes]]:
    """The handshake headers of a browser logged in as `user`: session and CSRF cookies, a same-site origin."""
    client = Client()
    client.force_login(user)
    client.get("/accounts/login/")  # sets the CSRF cookie too
    cookies = "; ".join(f"{name}={morsel.value}" for name, morsel in client.cookies.items())
    return [(b"cookie", cookies.encode()), (b"origin", b"http://localhost"), (b"host", b"localhost")]


async def receive_until(communicator, needle: str, timeout: float = 5.0) -> str:
    """The first frame containing `needle`; fails naming the frames seen instead."""
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
