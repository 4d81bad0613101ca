"""Reads of a project's workspace: the tree (now or at a version), a file, its history, a step's changes.

Each read is one or two indexed statements whatever the project's history: the
latest tree comes from `WorkspaceFile` (a row a path), an older tree probes
`FileVersion`'s (project, path, version) index once per path, a history reads
that index for one path.
"""

from __future__ import annotations

import difflib
import io
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

from django.db import connection

from coordination import rows
from coordination.errors import InvalidRequest, NotFound
from coordination.models import Blob, Project, Step
from coordination.services.workspace import blob_bytes

MAX_DIFF_BYTES = 512 * 1024

_FILE_COLUMNS = """v.id, v.path, v.version, v.sha256, v.size, v.deleted, v.changed_at, v.step_id, v.fencing,
       coalesce(a.name, u.username) AS agent"""

# Plain SQL: the live tree under a prefix from the latest state of each path, with who wrote it (one statement).
TREE_NOW_SQL = f"""
SELECT {_FILE_COLUMNS}
FROM coordination_workspacefile f
JOIN coordination_fileversion v ON v.id = f.current_id
LEFT JOIN coordination_agent a ON a.id = v.agent_id
LEFT JOIN auth_user u ON u.id = v.user_id
WHERE f.project_id = %(project)s AND NOT f.deleted AND f.path LIKE %(prefix)s
ORDER BY f.path
"""

# Plain SQL: the tree as it was at a version: one probe of the history index per path the project ever had.
TREE_AT_SQL = f"""
SELECT {_FILE_COLUMNS}
FROM coordination_workspacefile f
CROSS JOIN LATERAL (
    SELECT * FROM coordination_fileversion h
    WHERE h.project_id = f.project_id AND h.path = f.path AND h.version <= %(version)s
    ORDER BY h.version DESC LIMIT 1
) v
LEFT JOIN coordination_agent a ON a.id = v.agent_id
LEFT JOIN auth_user u ON u.id = v.user_id
WHERE f.project_id = %(project)s AND f.path LIKE %(prefix)s AND NOT v.deleted
ORDER BY f.path
"""

# Plain SQL: one file as it was at a version (its newest change at or before it), one index probe.
FILE_AT_SQL = f"""
SELECT {_FILE_COLUMNS}, v.blob_id
FROM coordination_fileversion v
LEFT JOIN coordination_agent a ON a.id = v.agent_id
LEFT JOIN auth_user u ON u.id = v.user_id
WHERE v.project_id = %(project)s AND v.path = %(path)s AND v.version <= %(version)s
ORDER BY v.version DESC LIMIT 1
"""

# Plain SQL: a file's history, newest first, through the same index.
HISTORY_SQL = f"""
SELECT {_FILE_COLUMNS}
FROM coordination_fileversion v
LEFT JOIN coordination_agent a ON a.id = v.agent_id
LEFT JOIN auth_user u ON u.id = v.user_id
WHERE v.project_id = %(project)s AND v.path = %(path)s
ORDER BY v.version DESC
LIMIT %(limit)s
"""

# Plain SQL: a step's changes with the content each replaced (the path's previous version), one statement.
STEP_CHANGES_SQL = f"""
SELECT {_FILE_COLUMNS}, v.blob_id, p.name AS project, prev.sha256 AS sha256_before, prev.blob_id AS blob_before,
       prev.deleted AS deleted_before
FROM coordination_fileversion v
JOIN coordination_project p ON p.id = v.project_id
LEFT JOIN coordination_agent a ON a.id = v.agent_id
LEFT JOIN auth_user u ON u.id = v.user_id
LEFT JOIN LATERAL (
    SELECT h.sha256, h.blob_id, h.deleted FROM coordination_fileversion h
    WHERE h.project_id = v.project_id AND h.path = v.path AND h.version < v.version
    ORDER BY h.version DESC LIMIT 1
) prev ON true
WHERE v.step_id = %(step)s
ORDER BY v.version, v.path
"""


def project_get(*, name: str) -> Project:
    project = Project.objects.filter(name=name).first() if isinstance(name, str) else None
    if project is None:
        raise NotFound(f"Project {name!r} does not exist.")
    return project


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _version(project: Project, version: int | None) -> int:
    if version is None:
        return project.workspace_version
    if version < 0 or version > project.workspace_version:
        raise InvalidRequest(f"version={version} is out of range: the workspace of {project.name!r} is at "
                             f"version {project.workspace_version}.")
    return version


def workspace_tree(*, project: Project, prefix: str = "", version: int | None = None) -> tuple[int, list[dict]]:
    """The files under `prefix` now, or as they were at `version`: (the version shown, the files)."""
    at = _version(project, version)
    params = {"project": project.id, "prefix": _like_prefix(prefix), "version": at}
    with connection.cursor() as cursor:
        if at == project.workspace_version:
            cursor.execute(TREE_NOW_SQL, params)
        else:
            cursor.execute(TREE_AT_SQL, params)
        return at, rows.fetch_all_named(cursor)


@dataclass
class FileRead:
    entry: dict[str, Any]
    content: bytes


def workspace_file(*, project: Project, path: str, version: int | None = None) -> FileRead:
    """A file's bytes now, or as it was at `version`; `NotFound` when it did not exist then."""
    at = _version(project, version)
    with connection.cursor() as cursor:
        cursor.execute(FILE_AT_SQL, {"project": project.id, "path": path, "version": at})
        entry = rows.fetch_named(cursor)
    if entry is None or entry["deleted"]:
        when = f" at version {version}" if version is not None else ""
        raise NotFound(f"No file {path} in project {project.name!r}{when}.", path=path)
    blob = Blob.objects.get(sha256=entry["blob_id"])
    return FileRead(entry=entry, content=blob_bytes(blob))


def workspace_history(*, project: Project, path: str, limit: int = 1000) -> list[dict]:
    with connection.cursor() as cursor:
        cursor.execute(HISTORY_SQL, {"project": project.id, "path": path, "limit": limit})
        history = rows.fetch_all_named(cursor)
    if not history:
        raise NotFound(f"No file {path} in project {project.name!r} has ever existed.", path=path)
    return history


def text_of(content: bytes) -> str | None:
    """The content as text, or None for binary (a NUL byte, or not UTF-8)."""
    if b"\x00" in content:
        return None
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return None


def unified_diff(path: str, before: bytes | None, after: bytes | None) -> str | None:
    """A unified diff between two contents of `path` (None: absent), or None when either is binary or large."""
    if (before and len(before) > MAX_DIFF_BYTES) or (after and len(after) > MAX_DIFF_BYTES):
        return None
    old = text_of(before) if before is not None else ""
    new = text_of(after) if after is not None else ""
    if old is None or new is None:
        return None
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                        fromfile=f"a/{path}" if before is not None else "/dev/null",
                                        tofile=f"b/{path}" if after is not None else "/dev/null"))


def step_changes(*, step: Step) -> list[dict]:
    """Every file the step's attempts changed, in order: sha256 before and after, and a diff for text."""
    with connection.cursor() as cursor:
        cursor.execute(STEP_CHANGES_SQL, {"step": step.id})
        changes = rows.fetch_all_named(cursor)
    shas = {c["blob_id"] for c in changes if c["blob_id"]} | {c["blob_before"] for c in changes if c["blob_before"]}
    blobs = {blob.sha256: blob for blob in Blob.objects.filter(sha256__in=shas)}
    out = []
    for change in changes:
        before = None if change["blob_before"] is None or change["deleted_before"] else blob_bytes(
            blobs[change["blob_before"]])
        after = None if change["deleted"] else blob_bytes(blobs[change["blob_id"]])
        out.append({**change, "sha256_before": change["sha256_before"] if not change["deleted_before"] else None,
                    "diff": unified_diff(change["path"], before, after),
                    "binary": (after is not None and text_of(after) is None)
                    or (before is not None and text_of(before) is None)})
    return out


def archive_chunks(*, project: Project, prefix: str = "", version: int | None = None) -> tuple[int, Iterator[bytes]]:
    """The tree as a .tar.gz, produced file by file (for a streaming response): (the version, the chunks)."""
    at, files = workspace_tree(project=project, prefix=prefix, version=version)

    def generate() -> Iterator[bytes]:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            for batch_start in range(0, len(files), 200):
                batch = files[batch_start:batch_start + 200]
                blobs = {blob.sha256: blob for blob in Blob.objects.filter(sha256__in=[f["sha256"] for f in batch])}
                for entry in batch:
                    content = blob_bytes(blobs[entry["sha256"]])
                    info = tarfile.TarInfo(name=entry["path"])
                    info.size = len(content)
                    info.mode = 0o644
                    info.mtime = int(entry["changed_at"].timestamp()) if entry["changed_at"] else int(time.time())
                    archive.addfile(info, io.BytesIO(content))
                    if buffer.tell() > 256 * 1024:
                        yield buffer.getvalue()
                        buffer.seek(0)
                        buffer.truncate()
        yield buffer.getvalue()

    return at, generate()

