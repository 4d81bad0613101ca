"""16 clients hammer overlapping paths on real PostgreSQL; the stored grant history proves the invariants."""

import random
import threading
import time
from collections import defaultdict
from datetime import datetime

import pytest
from django.db import connection

from coordination.services import file_locks
from coordination.errors import LockConflict
from coordination.models import FileLock
from coordination.paths import paths_overlap

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PATHS = ["a.md", "b.md", "src/", "src/app.py", "src/lib/util.py", "docs/", "docs/guide.md", "README.md"]
CLIENTS = 16
# The run goes on until it has made this many grants and met this many conflicts (however fast the machine),
# within a cap that only a hang reaches.
GRANTS, CONFLICTS, CAP_SECONDS = 150, 20, 120.0


def _end(lock) -> datetime:
    return min(lock.released_at, lock.expires_at) if lock.released_at else lock.expires_at


class LockConcurrencyTests:
    def test_no_two_conflicting_grants_ever_overlap_and_fencing_grows(self, make_agent):
        agents = [make_agent(f"hammer-{i}", ["developer"]) for i in range(CLIENTS)]
        stop_at = time.monotonic() + CAP_SECONDS
        counts = defaultdict(int)
        counted = threading.Lock()
        enough = threading.Event()
        errors: list[BaseException] = []

        def count(what: str) -> None:
            with counted:
                counts[what] += 1
                if counts["grants"] >= GRANTS and counts["conflicts"] >= CONFLICTS:
                    enough.set()

        def hammer(agent, seed: int) -> None:
            rng = random.Random(seed)
            try:
                while not enough.is_set() and time.monotonic() < stop_at:
                    paths = rng.sample(PATHS, rng.choice([1, 1, 2, 3]))
                    mode = rng.choice(["read", "write"])
                    abandon = rng.random() < 0.05  # some holders die: their locks only expire
                    try:
                        locks = file_locks.locks_acquire(agent=agent.agent, paths=paths, mode=mode,
                                                       wait_s=rng.choice([0, 0, 0.2]), ttl_s=1 if abandon else 30)
                    except LockConflict:
                        count("conflicts")
                        continue
                    count("grants")
                    time.sleep(rng.random() * 0.004)
                    if not abandon:
                        for lock in locks:
                            file_locks.lock_release(lock_id=lock.id, agent=agent.agent)
            except BaseException as exc:  # noqa: BLE001 - reported to the test
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=hammer, args=(agent, index)) for index, agent in enumerate(agents)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=CAP_SECONDS + 30)
        assert not errors, errors[:3]
        assert enough.is_set(), f"{dict(counts)} within {CAP_SECONDS} s"

        history = list(FileLock.objects.all())
        by_path: dict[str, list] = defaultdict(list)
        for lock in history:
            by_path[lock.path].append(lock)

        # Fencing numbers strictly increase with the grant order of each path.
        for path, locks in by_path.items():
            locks.sort(key=lambda lock: (lock.acquired_at, lock.fencing))
            fencing = [lock.fencing for lock in locks]
            assert fencing == sorted(fencing) and len(set(fencing)) == len(fencing), path

        # No two conflicting grants (overlapping paths, a writer among them, other holders) overlap in time.
        violations = []
        for p in by_path:
            for q in by_path:
                if p > q or not paths_overlap(p, q):
                    continue
                for a in by_path[p]:
                    for b in by_path[q]:
                        if a.id == b.id or (a.agent_id == b.agent_id and a.step_id == b.step_id):
                            continue
                        if a.mode == "read" and b.mode == "read":
                            continue
                        if a.acquired_at < _end(b) and b.acquired_at < _end(a):
                            violations.append((a.path, a.mode, a.acquired_at, _end(a), b.path, b.mode, b.acquired_at, _end(b)))
        assert not violations, violations[:5]
