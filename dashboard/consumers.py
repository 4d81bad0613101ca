"""WebSocket consumers of the dashboard: one per page, subscribed to its group, pushing rendered partials."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.utils.html import escape

from coordination.events import OVERVIEW_GROUP, project_group, workflow_group
from coordination.models import Project, Step
from dashboard import live

logger = logging.getLogger(__name__)


# Partials are rendered once per event for every page showing the same thing to the same
# kind of viewer (staff or not), and shared by the sockets of this process; each socket then
# puts its own session's CSRF token in place of this marker.
CSRF_MARKER = "am-csrf-token-marker"
_SHARED_RENDERS_MAX = 256
_shared_renders: OrderedDict[tuple, asyncio.Future] = OrderedDict()


# Redis carries the events to this process; when it stops answering, pages must not sit
# silent as if nothing happened. Every PING_S a watch pings it and, on failure, closes
# every page socket of this process with CLOSE_LAYER_DOWN: pages show "live updates
# paused", reconnect with backoff, and catch up from the event log once Redis is back.
PING_S = 2.0
CLOSE_LAYER_DOWN = 4503


async def _ping_layer() -> None:
    import redis.asyncio as aioredis
    from django.conf import settings

    client = aioredis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        await client.ping()
    finally:
        await client.aclose()


class _LayerWatch:
    """One per event loop (process): the sockets to close when the channel layer's Redis stops answering."""

    def __init__(self) -> None:
        self.sockets: set[_PageConsumer] = set()
        self.task: asyncio.Task | None = None

    def add(self, consumer: _PageConsumer) -> None:
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.sockets = set()
            self.task = loop.create_task(self._run())
        self.sockets.add(consumer)

    def discard(self, consumer: _PageConsumer) -> None:
        self.sockets.discard(consumer)

    async def _run(self) -> None:
        while self.sockets:
            await asyncio.sleep(PING_S)
            try:
                await _ping_layer()
            except Exception:  # noqa: BLE001 - any failure to reach Redis means no live updates
                logger.warning("Redis does not answer; closing %d dashboard socket(s) until it does.",
                               len(self.sockets))
                for consumer in list(self.sockets):
                    await consumer.close(code=CLOSE_LAYER_DOWN)
                self.sockets.clear()
        self.task = None


_watch = _LayerWatch()


class _PageConsumer(AsyncWebsocketConsumer):
    group = ""

    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        if not await database_sync_to_async(self.resolve)():
            await self.close(code=4404)
            return
        # Forms in pushed partials need the session's CSRF token; Django accepts its unmasked secret.
        self.viewer = {"user": user, "csrf_token": self.scope.get("cookies", {}).get("csrftoken", "")}
        try:
            await self.channel_layer.group_add(self.group, self.channel_name)
        except Exception:  # noqa: BLE001 - Redis is down: refuse, the page retries and says it is paused
            logger.warning("Cannot subscribe a dashboard socket: Redis does not answer.")
            await self.close(code=CLOSE_LAYER_DOWN)
            return
        await self.accept()
        _watch.add(self)

    async def disconnect(self, code):
        _watch.discard(self)
        if self.group:
            try:
                await self.channel_layer.group_discard(self.group, self.channel_name)
            except Exception:  # noqa: BLE001 - Redis is down; the subscription went with it
                pass

    def resolve(self) -> bool:
        return True

    async def receive(self, text_data=None, bytes_data=None):
        """A page back from a disconnection asks for what it missed: {"catch_up_after": seq}."""
        try:
            message = json.loads(text_data or "{}")
            after = int(message.get("catch_up_after", 0))
        except (ValueError, TypeError, AttributeError):
            return
        html = await database_sync_to_async(self.refresh)(max(0, after))
        if html:
            await self.send(text_data=html)

    async def am_event(self, message):
        html = await self._shared_render(message["event"])
        if html:
            await self.send(text_data=html.replace(CSRF_MARKER, escape(self.viewer["csrf_token"])))

    async def _shared_render(self, event: dict) -> str:
        user = self.viewer["user"]
        key = (type(self).__name__, self.render_target(), event["id"], bool(user.is_staff))
        future = _shared_renders.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            _shared_renders[key] = future
            while len(_shared_renders) > _SHARED_RENDERS_MAX:
                _shared_renders.popitem(last=False)
            try:
                html = await database_sync_to_async(self.render)(event, {"user": user, "csrf_token": CSRF_MARKER})
            except BaseException as exc:
                _shared_renders.pop(key, None)
                future.set_exception(exc)
                future.exception()  # retrieved here: the sockets sharing it see it raised
                raise
            future.set_result(html)
        return await asyncio.shield(future)

    def render_target(self):
        """What this page shows (with the event, the key of a shared render)."""
        return None

    def render(self, event: dict, viewer: dict) -> str:
        raise NotImplementedError

    def refresh(self, after: int) -> str:
        raise NotImplementedError


class OverviewConsumer(_PageConsumer):
    group = OVERVIEW_GROUP

    def render(self, event, viewer):
        return live.overview(event["id"], viewer)

    def refresh(self, after):
        return live.overview_refresh(self.viewer)


class WorkflowConsumer(_PageConsumer):
    def resolve(self):
        self.workflow_id = self.scope["url_route"]["kwargs"]["workflow_id"]
        self.group = workflow_group(self.workflow_id)
        from coordination.models import Workflow

        return Workflow.objects.filter(id=self.workflow_id).exists()

    def render_target(self):
        return str(self.workflow_id)

    def render(self, event, viewer):
        return live.workflow(self.workflow_id, event["id"], viewer)

    def refresh(self, after):
        return live.workflow_refresh(self.workflow_id, after, self.viewer)


class StepConsumer(_PageConsumer):
    def resolve(self):
        self.step_id = self.scope["url_route"]["kwargs"]["step_id"]
        workflow_id = Step.objects.filter(id=self.step_id).values_list("workflow_id", flat=True).first()
        if workflow_id is None:
            return False
        self.group = workflow_group(workflow_id)
        return True

    def render_target(self):
        return str(self.step_id)

    def render(self, event, viewer):
        return live.step(self.step_id, event["id"], viewer)

    def refresh(self, after):
        return live.step_refresh(self.step_id, self.viewer)


class ProjectConsumer(_PageConsumer):
    """A project page showing the latest version: its tree (under ?dir=) and, on a file's page, that file."""

    def resolve(self):
        kwargs = self.scope["url_route"]["kwargs"]
        self.project = kwargs["project"]
        self.path = kwargs.get("path")
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        directory = (query.get("dir") or [""])[0]
        self.directory = directory if directory.endswith("/") and directory != "./" else ""
        self.group = project_group(self.project)
        return Project.objects.filter(name=self.project).exists()

    def render_target(self):
        return (self.project, self.path, self.directory)

    def render(self, event, viewer):
        return live.project(self.project, self.path, self.directory, event["id"], viewer)

    def refresh(self, after):
        return live.project_refresh(self.project, self.path, self.directory, self.viewer)
