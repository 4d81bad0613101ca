"""Tools an agent uses on its project's workspace: list, read, write and delete files, run a
command (when the worker allows it), and finish.

The tools read the local mirror (agents/mirror.py); a write or delete goes to the
server first, under a write lock's fencing number, and reaches the mirror only
once the server took it. A path the step did not declare for writing is locked
first, through the API under the step's lease. Every path is confined to the
workspace: an absolute path, `..` that climbs out, or a symlink that leads out
is refused, and the refusal is told to the LLM as the observation.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.client import ApiError, Unreachable
from agents.errors import LeaseLost
from agents.mirror import STATE_DIR, Change, Mirror, atomic_write

MAX_READ_BYTES = 100_000
MAX_LIST_ENTRIES = 300
# Kept of a command's output: its start and, mostly, its end (where errors are).
COMMAND_OUTPUT_HEAD = 1000
COMMAND_OUTPUT_TAIL = 2500
# Never handed to a command: the agent's token and the LLM's key live in these.
SECRET_ENV_PREFIXES = ("AM_",)
SECRET_ENV_NAMES = {"OPENAI_API_KEY"}

TOOL_DOCS = {
    "list_files": "list_files(path='.') - the files under a directory of the workspace.",
    "read_file": "read_file(path) - the text of a file (first 100 kB).",
    "write_file": "write_file(path, content) - create or replace a file with this text.",
    "delete_file": "delete_file(path) - delete a file.",
    "finish": "finish(result, outputs={}) - end the step: `result` is your final answer for the next steps.",
}
COMMAND_DOC = ("run_command(command, timeout_s=...) - run a shell command in the workspace (e.g. the tests); "
               "you see its exit code and output, and the files it created, changed or deleted are saved.")


class ToolError(Exception):
    """A tool could not do what was asked; the message becomes the observation."""


@dataclass
class CommandPolicy:
    """How `run_command` runs: it is offered only when the worker was started with --allow-commands."""

    timeout_s: float = 120.0


def covers(lock_path: str, path: str) -> bool:
    """Whether a lock on `lock_path` covers the file `path` (as the server decides it)."""
    if lock_path in ("./", path, path + "/"):
        return True
    return lock_path.endswith("/") and path.startswith(lock_path)


@dataclass
class Workspace:
    root: Path
    # The project's mirror; None: a plain local directory with no server behind it (unit tests).
    mirror: Mirror | None = None
    # Write locks held for the step: those granted with the lease (`lease.locks`) and those taken since.
    locks: list[dict[str, Any]] = field(default_factory=list)
    # Takes write locks on paths under the lease and returns them; raises ToolError on a conflict,
    # LeaseLost on a stale lease.
    lock_writer: Callable[[list[str]], list[dict[str, Any]]] | None = None
    commands: CommandPolicy | None = None
    written: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.locks = [lock for lock in self.locks if lock.get("mode", "write") == "write"]

    def tool_docs(self) -> dict[str, str]:
        """The tools offered to the LLM: run_command only when the worker allows commands."""
        docs = {name: doc for name, doc in TOOL_DOCS.items() if name != "finish"}
        if self.commands is not None:
            docs["run_command"] = COMMAND_DOC
        docs["finish"] = TOOL_DOCS["finish"]
        return docs

    def relative(self, raw: Any) -> str:
        """The normalised workspace-relative form of `raw`, or ToolError naming what is wrong."""
        if not isinstance(raw, str) or not raw.strip():
            raise ToolError("Give a path relative to the workspace, e.g. 'notes/plan.md'.")
        if "\x00" in raw:
            raise ToolError("A path cannot contain a NUL character.")
        if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
            raise ToolError(f"{raw!r} is outside the workspace: use a relative path such as 'docs/x.md'.")
        normalised = posixpath.normpath(raw.replace("\\", "/"))
        if normalised == ".." or normalised.startswith("../"):
            raise ToolError(f"{raw!r} climbs out of the workspace: stay inside it.")
        target = (self.root / normalised).resolve()
        if target != self.root and self.root not in target.parents:
            raise ToolError(f"{raw!r} leads outside the workspace (through a link): stay inside it.")
        if normalised == STATE_DIR or normalised.startswith(STATE_DIR + "/"):
            raise ToolError(f"{raw!r} is the mirror's own bookkeeping, not a file of the project.")
        return "." if normalised == "." else normalised

    def _guard(self) -> contextlib.AbstractContextManager[None]:
        # On a shared mirror, a command of another agent may be changing files: wait for it.
        return self.mirror.guard() if self.mirror is not None else contextlib.nullcontext()

    # --- locks --------------------------------------------------------------------

    def _fencing(self, path: str) -> int | None:
        for lock in self.locks:
            if covers(lock["path"], path):
                return lock.get("fencing")
        return None

    def _held(self, path: str) -> bool:
        return any(covers(lock["path"], path) for lock in self.locks)

    def _lock(self, paths: list[str]) -> dict[str, int | None]:
        """Fencing numbers for writing `paths`: write locks held, or taken now under the lease."""
        missing = [path for path in paths if not self._held(path)]
        if missing and self.lock_writer is not None:
            self.locks += self.lock_writer(missing)
        elif missing:  # no server to ask (a plain directory)
            self.locks += [{"path": path, "mode": "write", "fencing": None} for path in missing]
        fencing = {path: self._fencing(path) for path in paths}
        if self.mirror is not None and any(number is None for number in fencing.values()):
            unlocked = ", ".join(path for path, number in fencing.items() if number is None)
            raise ToolError(f"No write lock with a fencing number covers {unlocked}.")
        return fencing

    def _refused(self, exc: ApiError, paths: list[str], what: str) -> ToolError:
        """Drop the locks the server no longer honours, and say what happened."""
        if exc.code in ("stale_fencing", "lock_required"):
            self.locks = [lock for lock in self.locks if not any(covers(lock["path"], path) for path in paths)]
            return ToolError(
                f"{exc.code}: {exc.detail} Nothing was {what}, and the mirror holds what the server holds: "
                "read the file again before changing it (a new lock is taken for the next write).")
        return ToolError(f"The server refused it ({exc.code}: {exc.detail}); nothing was {what}.")

    # --- the tools ------------------------------------------------------------

    def list_files(self, path: str = ".") -> str:
        base = self.root / self.relative(path)
        with self._guard():
            if not base.exists():
                return f"{path} does not exist yet."
            if base.is_file():
                return self.relative(path)
            entries = []
            for current, dirs, files in os.walk(base):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                for name in sorted(files):
                    if name.startswith(".") and ".am-tmp-" in name:
                        continue
                    entries.append(str((Path(current) / name).relative_to(self.root)))
                    if len(entries) >= MAX_LIST_ENTRIES:
                        return "\n".join(entries) + f"\n... (more than {MAX_LIST_ENTRIES} files)"
        return "\n".join(entries) if entries else "(no files)"

    def read_file(self, path: str) -> str:
        relative = self.relative(path)
        target = self.root / relative
        with self._guard():
            if not target.is_file():
                raise ToolError(f"{relative} is not a file of the workspace; list_files shows what there is.")
            with open(target, "rb") as handle:
                data = handle.read(MAX_READ_BYTES)
        return data.decode("utf-8", errors="replace")

    def _file_path(self, path: Any) -> str:
        relative = self.relative(path)
        if relative == ".":
            raise ToolError("Give a file path, not the workspace itself.")
        return relative

    def write_file(self, path: str, content: Any) -> str:
        relative = self._file_path(path)
        if not isinstance(content, str):
            raise ToolError("`content` must be text.")
        data = content.encode("utf-8")
        fencing = self._lock([relative])[relative]
        if self.mirror is None:
            atomic_write(self.root / relative, data)
        else:
            try:
                self.mirror.write(relative, data, fencing=fencing)
            except ApiError as exc:
                raise self._refused(exc, [relative], "written") from exc
            except Unreachable as exc:
                raise ToolError(f"Could not write {relative}: the server is unreachable ({exc}).") from exc
        if relative not in self.written:
            self.written.append(relative)
        return f"Wrote {len(data)} bytes to {relative}."

    def delete_file(self, path: str) -> str:
        relative = self._file_path(path)
        if not (self.root / relative).is_file():
            raise ToolError(f"{relative} is not a file of the workspace; list_files shows what there is.")
        fencing = self._lock([relative])[relative]
        if self.mirror is None:
            (self.root / relative).unlink()
        else:
            try:
                self.mirror.delete(relative, fencing=fencing)
            except ApiError as exc:
                raise self._refused(exc, [relative], "deleted") from exc
            except Unreachable as exc:
                raise ToolError(f"Could not delete {relative}: the server is unreachable ({exc}).") from exc
        if relative not in self.written:
            self.written.append(relative)
        return f"Deleted {relative}."

    def run_command(self, command: Any, timeout_s: Any = None) -> str:
        """Run a command in the mirror, then send the files it changed as one batch under write locks.

        1. Hold the mirror (no other agent's sync or write changes it meanwhile) and sync it.
        2. Run the command with a timeout, without the agent's secrets, keeping part of its output.
        3. Find the files it created, changed or deleted; lock them (write, under the lease).
        4. Send them as one batch. A refused lock or batch sends nothing: the mirror is put back
           as the server holds it, and the LLM is told.
        """
        if self.commands is None or self.mirror is None:
            raise ToolError("run_command is not offered: this worker was started without --allow-commands.")
        if not isinstance(command, str) or not command.strip():
            raise ToolError("Give the command as text, e.g. 'python -m pytest -q'.")
        try:
            timeout = min(float(timeout_s), self.commands.timeout_s) if timeout_s else self.commands.timeout_s
        except (TypeError, ValueError):
            raise ToolError("timeout_s is a number of seconds.") from None
        with self.mirror.guard():
            try:
                self.mirror.sync()
            except (ApiError, Unreachable) as exc:
                raise ToolError(f"Could not bring the workspace up to date before the command: {exc}") from exc
            ran = run_process(command, cwd=self.root, timeout_s=timeout)
            changes = self.mirror.changes()
            if not changes:
                return f"{ran}\n(no files changed)"
            paths = [change.path for change in changes]
            try:
                fencing = self._lock(paths)
                answer = self.mirror.send(changes, {path: number for path, number in fencing.items()})
            except ApiError as exc:  # the batch was refused; `send` put the mirror back
                raise ToolError(f"{ran}\n\nThe files it changed were not saved: "
                                f"{self._refused(exc, paths, 'saved')}") from exc
            except (ToolError, LeaseLost, Unreachable) as exc:  # no locks, or no server: nothing was sent
                with contextlib.suppress(ApiError, Unreachable):
                    self.mirror.restore()
                if isinstance(exc, LeaseLost):
                    raise
                raise ToolError(f"{ran}\n\nThe files it changed were not saved ({exc}); the workspace is back "
                                "as the server holds it.") from exc
        for path in paths:
            if path not in self.written:
                self.written.append(path)
        return f"{ran}\nSaved as workspace version {answer.get('version')}: {_describe(changes)}."

    def run(self, tool: str, args: dict[str, Any]) -> str:
        if tool == "list_files":
            return self.list_files(args.get("path", "."))
        if tool == "read_file":
            return self.read_file(args.get("path"))
        if tool == "write_file":
            return self.write_file(args.get("path"), args.get("content"))
        if tool == "delete_file":
            return self.delete_file(args.get("path"))
        if tool == "run_command":
            return self.run_command(args.get("command"), args.get("timeout_s"))
        raise ToolError(f"There is no tool {tool!r}; use one of: {', '.join(self.tool_docs())}.")


def command_environment() -> dict[str, str]:
    """The worker's environment without its secrets, with the worker's Python first on PATH."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(SECRET_ENV_PREFIXES) and name not in SECRET_ENV_NAMES}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", os.defpath)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ among the project's files
    return env


def run_process(command: str, *, cwd: Path, timeout_s: float) -> str:
    """Run `command` in a shell in its own process group; its exit code and (part of) its output."""
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, shell=True, cwd=cwd, env=command_environment(), stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            # The whole group: nothing it started keeps changing the workspace afterwards.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        size = output.seek(0, os.SEEK_END)
        output.seek(0)
        if size <= COMMAND_OUTPUT_HEAD + COMMAND_OUTPUT_TAIL:
            text = output.read().decode("utf-8", errors="replace")
        else:
            head = output.read(COMMAND_OUTPUT_HEAD).decode("utf-8", errors="replace")
            output.seek(size - COMMAND_OUTPUT_TAIL)
            tail = output.read().decode("utf-8", errors="replace")
            text = f"{head}\n... ({size - COMMAND_OUTPUT_HEAD - COMMAND_OUTPUT_TAIL} bytes left out) ...\n{tail}"
    status = f"timed out after {timeout_s:.0f} s (stopped)" if code is None else f"exit code {code}"
    return f"$ {command}\n{status}\n{text.rstrip() or '(no output)'}"


def _describe(changes: list[Change]) -> str:
    return ", ".join(f"{change.path} ({change.kind})" for change in changes)

