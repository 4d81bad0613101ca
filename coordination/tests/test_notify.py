"""Waking long-polling pulls: as many waiters as steps became ready, longest waiting first, wakes passed on."""

from types import SimpleNamespace

import pytest

from coordination import notify
from coordination.services import pull


@pytest.fixture
def listener(monkeypatch):
    """A listener with no thread: notifications are handed to it by hand."""
    fresh = notify.Listener()
    monkeypatch.setattr(fresh, "ensure_started", lambda: None)
    monkeypatch.setattr(notify, "listener", fresh)
    return fresh


def _woken(waiters):
    return [index for index, waiter in enumerate(waiters) if waiter.event.is_set()]


class BoundedWakeTests:
    def test_a_step_ready_notification_wakes_as_many_waiters_as_steps_longest_waiting_first(self, listener):
        waiters = [listener.register(notify.STEP_READY, ["developer"]) for _ in range(5)]
        tester = listener.register(notify.STEP_READY, ["tester"])
        listener._wake(notify.STEP_READY, "developer:2")
        assert _woken(waiters) == [0, 1]
        assert not tester.event.is_set()
        listener._wake(notify.STEP_READY, "developer:2")  # the two already woken are not counted again
        assert _woken(waiters) == [0, 1, 2, 3]
        listener._wake(notify.STEP_READY, "developer:50")
        assert _woken(waiters) == [0, 1, 2, 3, 4]

    def test_a_bare_role_and_a_reconnect_wake_everyone_of_it(self, listener):
        waiters = [listener.register(notify.STEP_READY, ["developer"]) for _ in range(3)]
        listener._wake(notify.STEP_READY, "developer")
        assert _woken(waiters) == [0, 1, 2]
        for waiter in waiters:
            waiter.event.clear()
        listener._wake(None, None)
        assert _woken(waiters) == [0, 1, 2]

    def test_lock_notifications_still_wake_every_waiter_of_the_project(self, listener):
        waiters = [listener.register(notify.LOCKS, ["p1"]) for _ in range(3)]
        other = listener.register(notify.LOCKS, ["p2"])
        listener._wake(notify.LOCKS, "p1")
        assert _woken(waiters) == [0, 1, 2] and not other.event.is_set()

    def test_a_waiter_that_leaves_with_an_unused_wake_hands_it_on(self, listener):
        first, second, third = (listener.register(notify.STEP_READY, ["developer"]) for _ in range(3))
        listener._wake(notify.STEP_READY, "developer:1")
        assert first.event.is_set() and not second.event.is_set()
        listener.unregister(first)  # e.g. its pull failed: the step released for it must not wait for a timeout
        assert second.event.is_set() and not third.event.is_set()

    def test_a_pull_woken_for_one_role_that_took_another_passes_the_wake_on(self, listener):
        both = listener.register(notify.STEP_READY, ["developer", "tester"])
        developer = listener.register(notify.STEP_READY, ["developer"])
        listener._wake(notify.STEP_READY, "developer:1")
        assert both.event.is_set() and not developer.event.is_set()
        took_a_tester_step = [SimpleNamespace(step=SimpleNamespace(role="tester"))]
        pull._pass_on_unused_wakes(both, took_a_tester_step)
        assert developer.event.is_set()

    def test_a_pull_that_took_a_step_of_its_role_uses_its_wake(self, listener):
        first = listener.register(notify.STEP_READY, ["developer"])
        second = listener.register(notify.STEP_READY, ["developer"])
        listener._wake(notify.STEP_READY, "developer:1")
        pull._pass_on_unused_wakes(first, [SimpleNamespace(step=SimpleNamespace(role="developer"))])
        listener.unregister(first)
        assert not second.event.is_set()
