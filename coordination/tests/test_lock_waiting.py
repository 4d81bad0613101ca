"""Waiting for a lock: granted in order when the holder releases or the lock expires; a conflict when time runs out."""

import threading
import time

import pytest
from django.db import connection

from coordination.errors import LockConflict
from coordination.models import LockWaiter
from coordination.services import file_locks
from coordination.tests.agent_calls import acquire

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _in_thread(fn, results, key):
    def run():
        try:
            results[key] = fn()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            results[key] = exc
        finally:
            connection.close()
    thread = threading.Thread(target=run)
    thread.start()
    return thread


class LockWaitingTests:
    def test_it_grants_a_waiting_request_when_the_holder_releases(self, make_agent):
        holder = make_agent("holder", ["developer"])
        waiter = make_agent("waiter", ["developer"])
        [lock] = acquire(holder, ["a.md"])
        results: dict = {}
        started = time.monotonic()
        thread = _in_thread(lambda: acquire(waiter, ["a.md"], wait_s=15), results, "waiter")
        time.sleep(1.0)
        assert thread.is_alive()
        assert LockWaiter.objects.count() == 1
        file_locks.lock_release(lock_id=lock.id, agent=holder.agent)
        thread.join(timeout=20)
        assert isinstance(results["waiter"], list), results
        assert time.monotonic() - started < 10
        assert results["waiter"][0].fencing > lock.fencing
        assert LockWaiter.objects.count() == 0

    def test_it_does_not_let_later_readers_starve_a_waiting_writer(self, make_agent):
        reader = make_agent("reader", ["developer"])
        writer = make_agent("writer", ["developer"])
        late_reader = make_agent("late-reader", ["developer"])
        [read_lock] = acquire(reader, ["doc.md"], "read")
        results: dict = {}
        thread = _in_thread(lambda: acquire(writer, ["doc.md"], "write", wait_s=15), results, "writer")
        time.sleep(1.0)
        # A reader arriving after the queued writer must not slip in, although it is compatible with the reader.
        with pytest.raises(LockConflict) as info:
            acquire(late_reader, ["doc.md"], "read")
        assert info.value.extra["conflicts"][0].get("queued") is True
        file_locks.lock_release(lock_id=read_lock.id, agent=reader.agent)
        thread.join(timeout=20)
        assert isinstance(results["writer"], list), results

    def test_it_answers_a_wait_that_runs_out_with_a_conflict_and_leaves_no_waiter(self, make_agent):
        holder = make_agent("holder", ["developer"])
        other = make_agent("other", ["developer"])
        acquire(holder, ["a.md"])
        started = time.monotonic()
        with pytest.raises(LockConflict):
            acquire(other, ["a.md"], wait_s=1)
        assert time.monotonic() - started >= 0.9
        assert LockWaiter.objects.count() == 0

    def test_it_grants_a_waiting_request_when_the_lock_expires(self, make_agent):
        holder = make_agent("holder", ["developer"])
        other = make_agent("other", ["developer"])
        acquire(holder, ["a.md"], ttl_s=2)
        started = time.monotonic()
        [lock] = acquire(other, ["a.md"], wait_s=10)
        assert 1.0 < time.monotonic() - started < 8
        assert lock.agent_id == other.agent.id
