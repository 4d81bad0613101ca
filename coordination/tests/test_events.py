"""Every change is logged in its transaction and reaches the channel layer (real Redis) after commit."""

import logging

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from am_project.celery import app as celery_app
from coordination import events
from coordination.events import OVERVIEW_GROUP, workflow_group
from coordination.models import Event
from coordination.services import pull, workflow_creation

pytestmark = pytest.mark.django_db


async def _subscribe(layer, *groups):
    channel = await layer.new_channel()
    for group in groups:
        await layer.group_add(group, channel)
    return channel


async def _receive(layer, channel, count, timeout=5.0):
    import asyncio

    messages = []
    for _ in range(count):
        messages.append(await asyncio.wait_for(layer.receive(channel), timeout))
    return messages


class EventPublishingTests:
    def test_a_change_reaches_the_workflow_and_overview_groups_after_commit(self, developer, step, workflow_spec,
                                                                            django_capture_on_commit_callbacks):
        from asgiref.sync import sync_to_async

        layer = get_channel_layer()
        workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            lease = pull.step_pull(agent=developer.agent, roles=["developer"])
        # Nothing was sent yet: the broadcast waits for the commit.
        assert callbacks, "the broadcast must be deferred to commit"

        async def scenario():
            # One event loop throughout: the pub/sub layer subscribes per loop.
            channel = await _subscribe(layer, workflow_group(workflow.id))
            overview = await _subscribe(layer, OVERVIEW_GROUP)
            await sync_to_async(lambda: [callback() for callback in callbacks])()
            return (await _receive(layer, channel, 1))[0], (await _receive(layer, overview, 1))[0]

        message, overview_message = async_to_sync(scenario)()
        assert message["type"] == "am.event"
        assert message["event"]["kind"] == "step.leased"
        created = Event.objects.get(workflow=workflow, kind="workflow.created")
        assert message["event"]["seq"] == Event.objects.get(workflow=workflow, kind="step.leased").seq > created.seq
        assert message["event"]["step_id"] == str(lease.step.id)
        assert overview_message["event"]["id"] == message["event"]["id"]

    def test_a_write_stands_when_redis_is_unreachable(self, developer, settings, tmp_path, monkeypatch, caplog, step,
                                                      workflow_spec, django_capture_on_commit_callbacks):
        from channels.layers import channel_layers

        settings.CHANNEL_LAYERS = {"default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [f"unix://{tmp_path}/no-redis.sock"]},
        }}
        channel_layers.backends.clear()
        # A publisher of its own, as in a process started while Redis is down: the shared one keeps the
        # layer it built when it started.
        publisher = events._Publisher()
        monkeypatch.setattr(events, "publisher", publisher)
        caplog.set_level(logging.WARNING, logger="coordination.events")
        try:
            with django_capture_on_commit_callbacks(execute=True):
                workflow = workflow_creation.workflow_create(spec=workflow_spec(step("A")))
            publisher.flush()
        finally:
            channel_layers.backends.clear()  # the publisher built its layer before the flush returned
        assert Event.objects.filter(workflow=workflow, kind="workflow.created").exists()
        warnings = [r.getMessage() for r in caplog.records
                    if r.name == "coordination.events" and r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings  # once per outage, not once per event
        assert "Could not publish" in warnings[0] and "Is Redis up?" in warnings[0]


class SweepScheduleTests:
    def test_beat_sweeps_expired_leases_every_interval(self, settings):
        celery_app.loader.import_default_modules()
        from am_project.celery import _beat_schedule

        _beat_schedule(celery_app)
        entry = celery_app.conf.beat_schedule["sweep-expired"]
        assert entry["task"] == "coordination.tasks.sweep_expired"
        assert entry["schedule"] == settings.AM_SWEEP_INTERVAL_S
        assert "coordination.tasks.sweep_expired" in celery_app.tasks
