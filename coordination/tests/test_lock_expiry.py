"""An expired lock blocks nobody, and the sweep records its end."""

from datetime import timedelta

import pytest
from django.utils import timezone

from coordination.models import Event, FileLock
from coordination.services import file_locks
from coordination.tests.agent_calls import acquire

pytestmark = pytest.mark.django_db


class LockExpiryTests:
    def test_it_lets_an_expired_lock_block_nobody_even_before_the_sweep(self, developer, other_developer):
        [lock] = acquire(developer, ["a.md"])
        FileLock.objects.filter(id=lock.id).update(expires_at=timezone.now() - timedelta(seconds=1))
        [mine] = acquire(other_developer, ["a.md"])
        assert mine.fencing > lock.fencing

    def test_it_sweeps_expired_locks_as_released_and_records_it(self, developer):
        [lock] = acquire(developer, ["a.md"])
        expired_at = timezone.now() - timedelta(seconds=1)
        FileLock.objects.filter(id=lock.id).update(expires_at=expired_at)
        assert file_locks.locks_sweep() == 1
        lock.refresh_from_db()
        assert lock.release_reason == "expired" and lock.released_at == expired_at
        assert Event.objects.filter(kind="locks.expired").exists()
        assert file_locks.locks_sweep() == 0
