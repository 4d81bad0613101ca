"""The workspace: every project's files, stored by AM and written only under fenced write locks.

A write (one file, a deletion, or a batch applied as one version) lands only if,
at that moment, each change's fencing number names a write lock that is live
(not expired, not released), held by the caller (for a lock under a lease: that
lease, still current) and covering the path. The check and the write are one
transaction: the lock rows are locked (`FOR UPDATE`) while the project's
advisory lock is held shared, so a release, an expiry sweep or a report ending
the lease waits for the write, and a new grant on the path (which takes the
advisory lock exclusively) waits for it too. A write can never land after its
lock ended or was granted to someone else.

Contents are stored once per SHA-256 (`Blob`); each change is a `FileVersion`
row numbered by the project's workspace version, moved in the same
transaction; `WorkspaceFile` keeps every path's latest state.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files.base import ContentFile
from django.core.files.storage import storages
from django.db import connection, transaction
from django.utils import timezone

from coordination import rows
from coordination.errors import (  # the workspace's own errors are re-exported from here
    Conflict,
    InvalidRequest,
    LockRequired,
    NotFound,
    PreconditionFailed,
    StaleFencing,
    TooLarge,
)
from coordination.models import Agent, Blob, FileVersion, LockMode, Project, StepStatus
from coordination.paths import covering_paths, normalise_file_path, paths_overlap
from coordination.services import event_log, lock_order

# One API request's batch; an import has its own limits (AM_MAX_ARCHIVE_FILES) and passes `max_changes`.
MAX_CHANGES_PER_BATCH = 1000
# New contents go to PostgreSQL in statements of about this many bytes (an import may bring hundreds of MB).
STORE_BATCH_BYTES = 32 * 1024 * 1024
# A `files.changed` event lists at most this many changes (an import of thousands of files is counted, not listed).
EVENT_MAX_CHANGES = 200
COLLECT_BATCH = 500
# A content nobody points to is kept this long (a write may be about to use it).
COLLECT_GRACE = timedelta(hours=1)


@dataclass
class Change:
    """One change of a write: new content for `path`, or its deletion (`content is None`)."""

    path: str
    content: bytes | None
    fencing: int | None = None


@dataclass
class Written:
    path: str
    version: int
    sha256: str
    size: int
    deleted: bool

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "version": self.version, "sha256": self.sha256, "size": self.size,
                **({"deleted": True} if self.deleted else {})}


# Plain SQL: the candidate locks of every change (same project, a covering path, the fencing number given),
# locked in id order, with the lease of the step each was taken under and the database clock, in one round trip.
CANDIDATE_LOCKS_SQL = """
SELECT l.id, l.path, l.mode, l.agent_id, l.step_id, l.fencing, l.expires_at, l.released_at,
       s.status AS step_status, s.lease_agent_id, s.lease_expires_at, s.lease_attempt_id, s.workflow_id,
       s.key AS step_key, clock_timestamp() AS now
FROM coordination_filelock l LEFT JOIN coordination_step s ON s.id = l.step_id
WHERE l.project_id = %(project)s AND l.path = ANY(%(paths)s::text[]) AND l.fencing = ANY(%(fencings)s::bigint[])
ORDER BY l.id
FOR UPDATE OF l
"""

# Plain SQL: the newest fencing number of each covering path, to tell a stale holder what is current.
CURRENT_FENCING_SQL = """
SELECT coalesce(max(last), 0) AS current FROM coordination_lockfence
WHERE project_id = %(project)s AND path = ANY(%(paths)s::text[])
"""

# Plain SQL: live locks of others overlapping a set of paths (a person's write must not go around them).
LIVE_LOCKS_SQL = """
SELECT l.path, l.mode, a.name AS agent_name, l.expires_at FROM coordination_filelock l
LEFT JOIN coordination_agent a ON a.id = l.agent_id
WHERE l.project_id = %(project)s AND l.released_at IS NULL AND l.expires_at > clock_timestamp()
"""

# Plain SQL: the next workspace version, read back in the same round trip (the project row: see lock_order).
NEXT_VERSION_SQL = """
UPDATE coordination_project SET workspace_version = workspace_version + 1 WHERE id = %(project)s
RETURNING workspace_version, clock_timestamp() AS now
"""

# Plain SQL: contents stored once, whoever wrote them first.
STORE_BLOBS_SQL = """
INSERT INTO coordination_blob (sha256, size, data, storage_name, created_at)
SELECT u.sha256, u.size, u.data, u.storage_name, statement_timestamp()
FROM unnest(%(sha256s)s::text[], %(sizes)s::bigint[], %(datas)s::bytea[], %(names)s::text[])
     AS u(sha256, size, data, storage_name)
ON CONFLICT (sha256) DO NOTHING
"""

# Plain SQL: every path's latest state in one upsert.
UPSERT_CURRENT_SQL = """
INSERT INTO coordination_workspacefile (project_id, path, current_id, version, sha256, size, deleted)
SELECT %(project)s, u.path, u.current_id, %(version)s, u.sha256, u.size, u.deleted
FROM unnest(%(paths)s::text[], %(ids)s::bigint[], %(sha256s)s::text[], %(sizes)s::bigint[], %(deleted)s::bool[])
     AS u(path, current_id, sha256, size, deleted)
ON CONFLICT (project_id, path) DO UPDATE
SET current_id = excluded.current_id, version = excluded.version, sha256 = excluded.sha256,
    size = excluded.size, deleted = excluded.deleted
"""

# Plain SQL: contents no version points to, older than the grace period, in bounded batches.
COLLECT_UNUSED_SQL = """
DELETE FROM coordination_blob b
WHERE b.sha256 IN (
    SELECT c.sha256 FROM coordination_blob c
    WHERE c.created_at < %(before)s
      AND NOT EXISTS (SELECT 1 FROM coordination_fileversion v WHERE v.blob_id = c.sha256)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
RETURNING b.sha256, b.storage_name
"""


def sha256_of(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def checked_changes(changes: list[Change], *, max_changes: int = MAX_CHANGES_PER_BATCH) -> list[Change]:
    """Paths normalised, sizes and counts within limits, one change per path; `InvalidPath`/`TooLarge` else."""
    if not changes:
        raise InvalidRequest("Give at least one change.")
    if len(changes) > max_changes:
        raise InvalidRequest(f"At most {max_changes} changes per batch; split it up.")
    seen: set[str] = set()
    checked = []
    for change in changes:
        path = normalise_file_path(change.path)
        if path in seen:
            raise InvalidRequest(f"{path} appears twice in one batch: send one change per path.")
        seen.add(path)
        if change.content is not None and len(change.content) > settings.AM_MAX_FILE_BYTES:
            raise TooLarge(f"{path} is {len(change.content)} bytes; the limit is {settings.AM_MAX_FILE_BYTES} "
                           "(AM_MAX_FILE_BYTES).", path=path, limit=settings.AM_MAX_FILE_BYTES)
        checked.append(Change(path=path, content=change.content, fencing=change.fencing))
    return checked


def _project(name: str) -> Project:
    project = Project.objects.filter(name=name).first() if isinstance(name, str) else None
    if project is None:
        raise NotFound(f"Project {name!r} does not exist: check the name (workflows and POST /v1/projects "
                       "create projects).")
    return project


def _lock_used(*, project: Project, changes: list[Change], agent: Agent) -> dict[str, dict[str, Any]]:
    """For each change, the lock row it is written under (locked); `LockRequired` or `StaleFencing` otherwise."""
    for change in changes:
        if change.fencing is None:
            raise LockRequired(f"Writing {change.path} needs the fencing number of a write lock that covers it "
                               "(X-AM-Fencing): acquire one with POST /v1/locks first.", path=change.path)
    covering = sorted({path for change in changes for path in covering_paths(change.path)})
    with connection.cursor() as cursor:
        cursor.execute(CANDIDATE_LOCKS_SQL, {"project": project.id, "paths": covering,
                                             "fencings": sorted({change.fencing for change in changes})})
        candidates = rows.fetch_all_named(cursor)
    used: dict[str, dict[str, Any]] = {}
    for change in changes:
        mine = [lock for lock in candidates
                if lock["fencing"] == change.fencing and paths_overlap(lock["path"], change.path)
                and lock["path"] in covering_paths(change.path)]
        usable = [lock for lock in mine if _usable(lock, agent)]
        if usable:
            used[change.path] = usable[0]
            continue
        if not mine:
            raise LockRequired(f"No lock of {change.path} has fencing {change.fencing}: acquire a write lock "
                               "first (POST /v1/locks) and send its fencing number.", path=change.path)
        if mine and all(lock["mode"] != LockMode.WRITE for lock in mine):
            raise LockRequired(f"Fencing {change.fencing} names a read lock on {mine[0]['path']}; writing "
                               f"{change.path} needs a write lock.", path=change.path)
        raise StaleFencing(
            f"Fencing {change.fencing} no longer allows writing {change.path} ({_why_not(mine, agent)}); nothing "
            "was written: drop the write, read the file again, lock it again.",
            path=change.path, current_fencing=_current_fencing(project, change.path))
    return used


def _usable(lock: dict[str, Any], agent: Agent) -> bool:
    now = lock["now"]
    if lock["mode"] != LockMode.WRITE or lock["released_at"] is not None or lock["expires_at"] <= now:
        return False
    if lock["agent_id"] != agent.id:
        return False
    if lock["step_id"] is not None:
        return (lock["step_status"] == StepStatus.IN_PROGRESS and lock["lease_agent_id"] == agent.id
                and lock["lease_expires_at"] is not None and lock["lease_expires_at"] > now)
    return True


def _why_not(locks: list[dict[str, Any]], agent: Agent) -> str:
    lock = locks[0]
    if lock["agent_id"] != agent.id:
        return "that lock is another agent's"
    if lock["released_at"] is not None:
        return "that lock was released"
    if lock["expires_at"] <= lock["now"]:
        return "that lock expired"
    return "the lease of the step it was taken under has ended"


def _current_fencing(project: Project, path: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(CURRENT_FENCING_SQL, {"project": project.id, "paths": covering_paths(path)})
        return rows.fetch_named(cursor)["current"]


def _no_locks_of_others(project: Project, changes: list[Change]) -> None:
    """A person's write (an import, an upload) must not go around the agents' live locks."""
    with connection.cursor() as cursor:
        cursor.execute(LIVE_LOCKS_SQL, {"project": project.id})
        live = rows.fetch_all_named(cursor)
    for change in changes:
        for lock in live:
            if paths_overlap(lock["path"], change.path):
                raise Conflict(f"{change.path} is locked ({lock['mode']}) by {lock['agent_name'] or 'another holder'}"
                               f" until {lock['expires_at']:%Y-%m-%dT%H:%M:%SZ}: wait for it, or release it in the "
                               "dashboard first.", path=change.path)


def _check_preconditions(project: Project, changes: list[Change], *, if_match: str | None,
                         if_none_match: bool) -> dict[str, Any]:
    from coordination.models import WorkspaceFile

    current = {row.path: row for row in WorkspaceFile.objects.filter(project=project,
                                                                     path__in=[c.path for c in changes])}
    for change in changes:
        existing = current.get(change.path)
        exists = existing is not None and not existing.deleted
        if change.content is None and not exists:
            raise NotFound(f"No file {change.path} in project {project.name!r}.", path=change.path)
        if if_none_match and exists:
            raise PreconditionFailed(f"{change.path} exists already (If-None-Match: *).", path=change.path,
                                     sha256=existing.sha256)
        if if_match is not None and (not exists or existing.sha256 != if_match):
            raise PreconditionFailed(f"{change.path} is no longer the content you read (If-Match).",
                                     path=change.path, sha256=existing.sha256 if exists else None)
    return current


def _store_contents(changes: list[Change]) -> None:
    """Store each new content once; above AM_WORKSPACE_INLINE_MAX_BYTES, in the configured storage."""
    contents = {sha256_of(c.content): c.content for c in changes if c.content is not None}
    if not contents:
        return
    known = set(Blob.objects.filter(sha256__in=list(contents)).values_list("sha256", flat=True))
    new = {sha: data for sha, data in contents.items() if sha not in known}
    if not new:
        return
    alias = settings.AM_WORKSPACE_STORAGE
    shas, sizes, datas, names = [], [], [], []
    pending = 0
    for sha, data in new.items():
        if alias and len(data) > settings.AM_WORKSPACE_INLINE_MAX_BYTES:
            names.append(storages[alias].save(f"{sha[:2]}/{sha}", ContentFile(data)))
            datas.append(None)
        else:
            names.append("")
            datas.append(data)
            pending += len(data)
        shas.append(sha)
        sizes.append(len(data))
        if pending >= STORE_BATCH_BYTES:
            _insert_blobs(shas, sizes, datas, names)
            shas, sizes, datas, names = [], [], [], []
            pending = 0
    if shas:
        _insert_blobs(shas, sizes, datas, names)


def _insert_blobs(shas: list[str], sizes: list[int], datas: list[bytes | None], names: list[str]) -> None:
    with connection.cursor() as cursor:
        cursor.execute(STORE_BLOBS_SQL, {"sha256s": shas, "sizes": sizes, "datas": datas, "names": names})


@lock_order.retrying
def workspace_write(*, project_name: str, changes: list[Change], agent: Agent | None = None,
                    user: AbstractBaseUser | None = None, system: bool = False, if_match: str | None = None,
                    if_none_match: bool = False,
                    max_changes: int = MAX_CHANGES_PER_BATCH) -> tuple[int, list[Written]]:
    """Apply changes as one new workspace version, all or none; return the version and what was written.

    An agent writes under its fenced write locks (see the module's rules). A
    person (an upload, an import) needs no lock, but is refused where an
    agent holds a live lock on the path; so is the system (`system=True`, an
    operator's `manage.py workspace_import`), which is neither an agent nor a
    person. `max_changes` is raised only by an import, bounded by its own limits.
    """
    changes = checked_changes(changes, max_changes=max_changes)
    if system and (agent is not None or user is not None):
        raise InvalidRequest("A system write is made by no agent and no person.")
    if agent is None and user is None and not system:
        raise InvalidRequest("A write is made by an agent, a person or the system.")
    project = _project(project_name)
    if agent is not None:
        lock_order.share_project(project.id)
        used = _lock_used(project=project, changes=changes, agent=agent)
    else:
        lock_order.lock_project(project.id)
        _no_locks_of_others(project, changes)
        used = {}
    _check_preconditions(project, changes, if_match=if_match, if_none_match=if_none_match)
    _store_contents(changes)
    with connection.cursor() as cursor:
        cursor.execute(NEXT_VERSION_SQL, {"project": project.id})
        moved = rows.fetch_named(cursor)
    # An agent's change is dated when its lock was found live; a person's when its version was allocated.
    version = moved["workspace_version"]
    now = min((lock["now"] for lock in used.values()), default=moved["now"])
    versions = []
    for change in changes:
        lock = used.get(change.path)
        sha = sha256_of(change.content) if change.content is not None else ""
        versions.append(FileVersion(
            project=project, path=change.path, version=version, blob_id=sha or None, sha256=sha,
            size=len(change.content) if change.content is not None else 0, deleted=change.content is None,
            changed_at=now, agent=agent, user=user if agent is None else None,
            step_id=lock["step_id"] if lock else None,
            attempt_id=lock["lease_attempt_id"] if lock and lock["step_id"] else None,
            lock_id=lock["id"] if lock else None, fencing=change.fencing if lock else None))
    FileVersion.objects.bulk_create(versions)
    with connection.cursor() as cursor:
        cursor.execute(UPSERT_CURRENT_SQL, {
            "project": project.id, "version": version, "paths": [v.path for v in versions],
            "ids": [v.id for v in versions], "sha256s": [v.sha256 for v in versions],
            "sizes": [v.size for v in versions], "deleted": [v.deleted for v in versions]})
    _record_changed(project=project, versions=versions, used=used, agent=agent, user=user)
    return version, [Written(v.path, version, v.sha256, v.size, v.deleted) for v in versions]


def _record_changed(*, project: Project, versions: list[FileVersion], used: dict[str, dict[str, Any]],
                    agent: Agent | None, user: AbstractBaseUser | None) -> None:
    """One `files.changed` event per workflow whose step made changes (or one without a workflow)."""
    by_workflow: dict[tuple[UUID | None, UUID | None, str], list[FileVersion]] = {}
    for version in versions:
        lock = used.get(version.path)
        key = (lock["workflow_id"], lock["step_id"], lock["step_key"]) if lock and lock["step_id"] else (None, None, "")
        by_workflow.setdefault(key, []).append(version)
    if agent is not None:
        who = {"agent": agent.name}
    else:
        who = {"by_user": user.get_username()} if user is not None else {"by": "system"}
    for (workflow_id, step_id, step_key), changed in sorted(by_workflow.items(), key=lambda item: str(item[0][0])):
        listed = changed[:EVENT_MAX_CHANGES]
        event_log.event_record(
            kind="files.changed", workflow_id=workflow_id, step_id=step_id,
            agent_id=agent.id if agent is not None else None,
            data={"project": project.name, "version": changed[0].version, **who,
                  **({"step": step_key} if step_key else {}),
                  "paths": [v.path for v in listed],
                  "changes": [{"path": v.path, "sha256": v.sha256, "size": v.size, "deleted": v.deleted,
                               "fencing": v.fencing} for v in listed],
                  **({"count": len(changed), "truncated": True} if len(changed) > len(listed) else {})})


def blob_bytes(blob: Blob) -> bytes:
    """A content's bytes, wherever it is stored."""
    if blob.data is not None:
        return bytes(blob.data)
    with storages[settings.AM_WORKSPACE_STORAGE or "workspace"].open(blob.storage_name, "rb") as handle:
        return handle.read()


def contents_collect(*, limit: int = COLLECT_BATCH) -> int:
    """Remove contents no file version points to (a deleted project's), in bounded batches (Celery beat)."""
    removed = 0
    while True:
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute(COLLECT_UNUSED_SQL, {"before": timezone.now() - COLLECT_GRACE, "limit": limit})
                gone = rows.fetch_all_named(cursor)
            names = [row["storage_name"] for row in gone if row["storage_name"]]
            if names:
                alias = settings.AM_WORKSPACE_STORAGE or "workspace"
                transaction.on_commit(lambda: [storages[alias].delete(name) for name in names])
        removed += len(gone)
        if len(gone) < limit:
            return removed

