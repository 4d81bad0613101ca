"""The agent's local mirror of its project's workspace, kept in step with the server.

The server holds the workspace; the mirror is a copy the tools read and a
command can run in. Layout: `--workspace DIR` holds one mirror per project,
`DIR/<project>/`, because a worker pulls steps of any workflow its roles match
and workflows name different projects. Beside the files, `DIR/<project>/.am-mirror/`
keeps `state.json` (path -> sha256, size and mtime as last synced) and `lock`.

1. `sync()` before a step: one listing request; only files whose sha256 differs
   from the mirror's are fetched; files the server no longer has are deleted.
   The state's size and mtime spare hashing files that did not change.
2. `write()` / `delete()` go to the server first (under a write lock's fencing
   number) and change the mirror only once the server took them; a refused one
   re-reads the path, so the mirror never differs from the server.
3. `changes()` tells what a command did: the files that differ from the state.
   `send()` sends them as one batch; a refused batch puts the mirror back.

Several agents (or slots) may share a mirror: every sync and write holds an
exclusive `flock` on `.am-mirror/lock`, which serialises threads and processes.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agents.client import UNCHANGED, ApiError, Client, Unreachable

try:
    import fcntl
except ImportError:  # Windows: only the threads of one process are kept apart
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("agents.mirror")

STATE_DIR = ".am-mirror"
# Not the project's files: what Python and pytest leave behind when a command runs tests.
IGNORED_DIRS = {STATE_DIR, "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}
IGNORED_FILES = ("*.pyc", ".*.am-tmp-*")



class _Guard:
    """One per mirror directory in a process: a re-entrant thread lock, and the `flock` that keeps
    other processes out while any thread of this one holds it (flock alone does not order the
    threads of one process)."""

    def __init__(self, lock_file: Path) -> None:
        self.lock_file = lock_file
        self.rlock = threading.RLock()
        self.depth = 0  # changed only by the thread holding `rlock`
        self.handle: Any = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self.rlock:
            if self.depth == 0 and fcntl is not None:
                self.handle = open(self.lock_file, "a+b")
                fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0 and self.handle is not None:
                    fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
                    self.handle.close()
                    self.handle = None


_guards: dict[Path, _Guard] = {}
_guards_lock = threading.Lock()


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Change:
    """A file a command created, changed (`content` set) or deleted (`content` None)."""

    path: str
    content: bytes | None

    @property
    def kind(self) -> str:
        return "deleted" if self.content is None else "written"


class Mirror:
    def __init__(self, base: Path, project: str, client: Client) -> None:
        self.project = project
        self.root = (Path(base) / project).resolve()
        self.client = client
        self.state_dir = self.root / STATE_DIR
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = self.state_dir / "state.json"
        with _guards_lock:
            self._guard = _guards.setdefault(self.root, _Guard(self.state_dir / "lock"))

    # --- the guard ----------------------------------------------------------------

    def guard(self) -> contextlib.AbstractContextManager[None]:
        """Hold the mirror for this thread alone, and for this process alone among those sharing it.
        Re-entrant: a command holds it while it syncs, runs, and sends what it changed."""
        return self._guard.hold()

    # --- state ----------------------------------------------------------------------

    def _load_state(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.state_file.read_text()).get("files", {})
        except (OSError, ValueError):
            return {}

    def _save_state(self, files: dict[str, dict[str, Any]], version: int | None = None) -> None:
        atomic_write(self.state_file, json.dumps({"project": self.project, "version": version, "files": files},
                                                  sort_keys=True).encode())

    def _entry(self, path: str, sha256: str) -> dict[str, Any]:
        stat = (self.root / path).stat()
        return {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    def _synced_entry(self, state: dict[str, dict[str, Any]], path: str) -> dict[str, Any] | None:
        """The state's entry of `path` while the mirror's file is still as last synced (same size and mtime)."""
        known = state.get(path)
        if not known:
            return None
        try:
            stat = (self.root / path).stat()
        except OSError:
            return None
        if stat.st_size != known.get("size") or stat.st_mtime_ns != known.get("mtime_ns"):
            return None
        return known

    # --- reading the mirror -----------------------------------------------------------

    def _local_paths(self) -> Iterator[str]:
        for current, dirs, files in os.walk(self.root):
            dirs[:] = sorted(d for d in dirs if d not in IGNORED_DIRS and not os.path.islink(os.path.join(current, d)))
            for name in sorted(files):
                full = os.path.join(current, name)
                if any(fnmatch.fnmatch(name, pattern) for pattern in IGNORED_FILES) or os.path.islink(full):
                    continue
                yield Path(full).relative_to(self.root).as_posix()

    def _local_hashes(self, state: dict[str, dict[str, Any]], *, trust_stat: bool) -> dict[str, str]:
        """path -> sha256 of every file in the mirror; with `trust_stat`, an unchanged size and mtime
        since the last sync is taken as unchanged content."""
        hashes = {}
        for path in self._local_paths():
            known = self._synced_entry(state, path) if trust_stat else None
            hashes[path] = known["sha256"] if known else _sha256_file(self.root / path)
        return hashes

    # --- keeping it in step ---------------------------------------------------------

    def sync(self) -> dict[str, int]:
        """Bring the mirror up to date with the server; how many files were fetched and deleted."""
        with self.guard():
            return self._sync()

    def _sync(self) -> dict[str, int]:
        try:
            tree = self.client.files(self.project)
        except ApiError as exc:
            if exc.status != 404:
                raise
            tree = {"version": 0, "files": []}  # no such project yet: an empty workspace
        server = {entry["path"]: entry["sha256"] for entry in tree["files"]}
        state = self._load_state()
        local = self._local_hashes(state, trust_stat=True)
        fetched = deleted = 0
        files: dict[str, dict[str, Any]] = {}
        for path, sha256 in server.items():
            if local.get(path) != sha256:
                content = self.client.file_bytes(self.project, path)
                if content is None:  # deleted since the listing: the next sync sees it
                    self._remove(path)
                    continue
                self._place(path, content)
                sha256 = sha256_of(content)
                fetched += 1
            files[path] = self._entry(path, sha256)
        for path in local.keys() - server.keys():
            self._remove(path)
            deleted += 1
        self._save_state(files, tree.get("version"))
        if fetched or deleted:
            logger.info("mirror %s: fetched %d, deleted %d file(s) (version %s)", self.project, fetched, deleted,
                        tree.get("version"))
        return {"fetched": fetched, "deleted": deleted}

    def refresh(self, paths: list[str]) -> None:
        """Make these paths what the server holds now (after a refused write)."""
        with self.guard():
            self._refresh(paths)

    def _refresh(self, paths: list[str]) -> None:
        state = self._load_state()
        for path in paths:
            # Asked for with the sha256 of the mirror's copy (hashed now: an edit may keep its size and mtime):
            # no body comes back while the server's file is the same.
            target = self.root / path
            local = _sha256_file(target) if target.is_file() and not target.is_symlink() else None
            content = self.client.file_bytes(self.project, path, unless_sha256=local)
            if content is UNCHANGED:
                state[path] = self._entry(path, local)
            elif content is None:
                self._remove(path)
                state.pop(path, None)
            else:
                self._place(path, content)
                state[path] = self._entry(path, sha256_of(content))
        self._save_state(state)

    def _refresh_quietly(self, path: str) -> None:
        # The mirror was not touched by the refused write; if the re-read fails too, the next sync catches up.
        try:
            self._refresh([path])
        except (ApiError, Unreachable) as exc:
            logger.warning("mirror %s: could not re-read %s after a refused write: %s", self.project, path, exc)

    # --- writing through ----------------------------------------------------------------

    def write(self, path: str, content: bytes, *, fencing: int) -> dict[str, Any]:
        """PUT the file under the lock's fencing number, then mirror it. A refusal (ApiError) leaves
        the path as the server holds it."""
        with self.guard():
            try:
                written = self.client.put_file(self.project, path, content, fencing=fencing)
            except ApiError:
                self._refresh_quietly(path)
                raise
            self._place(path, content)
            self._record(path, written.get("sha256") or sha256_of(content))
            return written

    def delete(self, path: str, *, fencing: int) -> dict[str, Any]:
        with self.guard():
            try:
                deleted = self.client.delete_file(self.project, path, fencing=fencing)
            except ApiError:
                self._refresh_quietly(path)
                raise
            self._remove(path)
            self._record(path, None)
            return deleted

    def changes(self) -> list[Change]:
        """What differs in the mirror from the last sync: files created, changed or deleted here.
        Every file is hashed: a command may change a file within the mtime's resolution."""
        with self.guard():
            state = self._load_state()
            local = self._local_hashes(state, trust_stat=False)
            found = [Change(path, (self.root / path).read_bytes())
                     for path, sha256 in sorted(local.items()) if state.get(path, {}).get("sha256") != sha256]
            found += [Change(path, None) for path in sorted(state.keys() - local.keys())]
            return found

    def send(self, changes: list[Change], fencing: dict[str, int]) -> dict[str, Any]:
        """Send the changes as one batch, all or none; on a refusal (ApiError) put the mirror back
        as the server holds it, and raise."""
        with self.guard():
            return self._send(changes, fencing)

    def restore(self) -> None:
        """Put the mirror back as the server holds it, undoing whatever was done here."""
        with self.guard():
            self._sync()

    def _send(self, changes: list[Change], fencing: dict[str, int]) -> dict[str, Any]:
        body = []
        for change in changes:
            item: dict[str, Any] = {"path": change.path, "fencing": fencing[change.path]}
            if change.content is None:
                item["delete"] = True
            else:
                try:
                    item["content"] = change.content.decode("utf-8")
                except UnicodeDecodeError:
                    item["content_b64"] = base64.b64encode(change.content).decode()
            body.append(item)
        try:
            answer = self.client.write_changes(self.project, body)
        except ApiError:
            self._sync()  # the whole mirror: a command may have left files the batch did not name
            raise
        written = {entry["path"]: entry.get("sha256") for entry in answer.get("files", [])}
        state = self._load_state()
        for change in changes:
            if change.content is None:
                state.pop(change.path, None)
            else:
                state[change.path] = self._entry(change.path, written.get(change.path) or sha256_of(change.content))
        self._save_state(state, answer.get("version"))
        return answer

    # --- files on disk ----------------------------------------------------------------------

    def _record(self, path: str, sha256: str | None) -> None:
        state = self._load_state()
        if sha256 is None:
            state.pop(path, None)
        else:
            state[path] = self._entry(path, sha256)
        self._save_state(state)

    def _place(self, path: str, content: bytes) -> None:
        target = self.root / path
        # The server's tree wins over what is in the way: a directory where it has a file, or the reverse.
        if target.is_dir() and not target.is_symlink():
            _remove_tree(target)
        for parent in reversed(target.relative_to(self.root).parents):
            if (self.root / parent).is_file():
                (self.root / parent).unlink()
        atomic_write(target, content)

    def _remove(self, path: str) -> None:
        target = self.root / path
        target.unlink(missing_ok=True)
        # Empty directories left behind go too, up to the mirror's root.
        parent = target.parent
        while parent != self.root and self.root in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def atomic_write(target: Path, content: bytes) -> None:
    """Write a sibling file and rename it, so a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.am-tmp-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(content)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _remove_tree(directory: Path) -> None:
    for current, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            os.unlink(os.path.join(current, name))
        for name in dirs:
            os.rmdir(os.path.join(current, name))
    directory.rmdir()
