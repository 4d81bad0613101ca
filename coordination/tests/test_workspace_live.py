"""Many agents writing overlapping paths of one workspace under locks, over a live server."""

import hashlib
import random
import threading
import time
from collections import Counter

import httpx
import pytest
from django.db import connection

from coordination import rows
from coordination.models import Blob, FileVersion, Project, WorkspaceFile
from coordination.paths import paths_overlap
from coordination.services import agent_registry, projects

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CLIENTS = 16
SECONDS = 6
PATHS = ["shared/a.txt", "shared/b.txt", "shared/c.txt", "docs/readme.md", "docs/guide.md", "top.txt"]
LOCK_TARGETS = PATHS + ["shared/", "docs/"]

# Plain SQL: every stored version with the lock it names, and any OTHER write lock overlapping the same path
# that was live at the moment of the write (there must be none).
_OVERLAPS_SQL = """
SELECT v.path, v.version, v.changed_at, v.fencing AS v_fencing, v.agent_id AS v_agent,
       l.id AS lock_id, l.mode, l.agent_id AS l_agent, l.fencing AS l_fencing, l.path AS lock_path,
       l.acquired_at, l.expires_at, l.released_at,
       (SELECT count(*) FROM coordination_filelock o
        WHERE o.project_id = v.project_id AND o.id <> l.id AND o.mode = 'write'
          AND o.acquired_at <= v.changed_at AND o.expires_at > v.changed_at
          AND (o.released_at IS NULL OR o.released_at > v.changed_at)
          AND (o.path = v.path OR o.path = './' OR v.path LIKE replace(o.path, '_', '\\_') || '%%'
               AND right(o.path, 1) = '/')) AS others_live
FROM coordination_fileversion v LEFT JOIN coordination_filelock l ON l.id = v.lock_id
WHERE v.project_id = %(project)s
ORDER BY v.version, v.path
"""


def _writer(base_url: str, token: str, seed: int, stop: threading.Event, log: list, statuses: Counter) -> None:
    rng = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        n = 0
        while not stop.is_set():
            target = rng.choice(LOCK_TARGETS)
            locked = client.post("/v1/locks", json={"project": "live", "paths": [target], "mode": "write",
                                                    "ttl_s": 2, "wait_s": 2})
            statuses[("lock", locked.status_code)] += 1
            if locked.status_code != 201:
                continue
            lock = locked.json()["locks"][0]
            covered = [p for p in PATHS if paths_overlap(target, p)]
            if rng.random() < 0.1:
                time.sleep(2.2)  # a paused holder: its lock expires under it; its write must be refused
            n += 1
            content = f"{seed}:{n}:{rng.random()}".encode()
            if len(covered) > 1 and rng.random() < 0.5:
                response = client.post("/v1/projects/live/changes", json={"changes": [
                    {"path": p, "content": content.decode(), "fencing": lock["fencing"]} for p in covered[:2]]})
                written = response.json().get("files", []) if response.status_code == 200 else []
            else:
                response = client.put(f"/v1/projects/live/files/{covered[0]}", content=content,
                                      headers={"X-AM-Fencing": str(lock["fencing"])})
                written = [response.json()] if response.status_code == 200 else []
            statuses[("write", response.status_code)] += 1
            for item in written:
                log.append((item["path"], item["version"], item["sha256"], hashlib.sha256(content).hexdigest()))
            client.delete(f"/v1/locks/{lock['id']}")


class ConcurrentWorkspaceWriteTests:
    def test_16_clients_write_overlapping_paths_only_under_live_exclusive_locks(self, live_am):
        project = projects.project_create(name="live")
        tokens = [agent_registry.agent_create(name=f"w{i}", roles=["developer"])[1] for i in range(CLIENTS)]
        stop = threading.Event()
        log: list = []
        statuses: Counter = Counter()
        threads = [threading.Thread(target=_writer, args=(live_am, token, i, stop, log, statuses))
                   for i, token in enumerate(tokens)]
        for thread in threads:
            thread.start()
        time.sleep(SECONDS)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(code >= 500 for (_, code) in statuses), statuses
        assert statuses[("write", 200)] > 20, statuses
        assert statuses[("write", 409)] > 0, "some paused holders should have been refused"

        project.refresh_from_db()
        with connection.cursor() as cursor:
            cursor.execute(_OVERLAPS_SQL, {"project": project.id})
            stored = rows.fetch_all_named(cursor)
        # Every stored version was written under a lock that was live, a write lock, its writer's, with the
        # fencing number given, and no other write lock on the path was live at that moment.
        for row in stored:
            assert row["lock_id"] is not None and row["mode"] == "write", row
            assert row["l_agent"] == row["v_agent"] and row["l_fencing"] == row["v_fencing"], row
            assert row["acquired_at"] <= row["changed_at"] < row["expires_at"], row
            assert row["released_at"] is None or row["released_at"] > row["changed_at"], row
            assert row["others_live"] == 0, row
        # Versions strictly increase, one per write or batch, without gaps.
        versions = sorted({row["version"] for row in stored})
        assert versions == list(range(1, project.workspace_version + 1))
        # Nothing acknowledged was lost or half-written: each answer is a stored version with its content.
        by_key = {(row["path"], row["version"]) for row in stored}
        for path, version, sha, sent in log:
            assert (path, version) in by_key and sha == sent
        for current in WorkspaceFile.objects.filter(project=project):
            newest = FileVersion.objects.filter(project=project, path=current.path).order_by("-version").first()
            assert current.current_id == newest.id and current.sha256 == newest.sha256
            blob = Blob.objects.get(sha256=current.sha256)
            assert hashlib.sha256(bytes(blob.data)).hexdigest() == current.sha256
        assert Project.objects.get(id=project.id).workspace_version == len(versions)
