"""Tools an agent uses on its workspace: list, read and write files, and finish.

Every path is confined to the workspace: an absolute path, `..` that climbs out,
or a symlink that leads out is refused, and the refusal is told to the LLM as
the observation. Before writing a file the step did not declare, the tool takes
a write lock through the API under the step's lease.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_READ_BYTES = 100_000
MAX_LIST_ENTRIES = 300

TOOL_DOCS = {
    "list_files": "list_files(path='.') - the files under a directory of the workspace.",
    "read_file": "read_file(path) - the text of a file (first 100 kB).",
    "write_file": "write_file(path, content) - create or replace a file with this text.",
    "finish": "finish(result, outputs={}) - end the step: `result` is your final answer for the next steps.",
}


class ToolError(Exception):
    """A tool could not do what was asked; the message becomes the observation."""


class LeaseLost(Exception):
    """The server says the lease is gone: drop the work."""


@dataclass
class Workspace:
    root: Path
    # Declared files of the step: {"path": ..., "mode": ...}; a path ending in "/" covers a directory.
    declared: list[dict[str, str]] = field(default_factory=list)
    # Takes a write lock through the API; raises ToolError on a conflict, LeaseLost on a stale lease.
    lock_writer: Callable[[str], None] | None = None
    written: list[str] = field(default_factory=list)
    locked: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

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
        return "." if normalised == "." else normalised

    def _covered_by_declared_write(self, path: str) -> bool:
        for file in self.declared:
            if file.get("mode") != "write":
                continue
            declared = file["path"]
            if declared == path or (declared.endswith("/") and (path.startswith(declared) or declared == "./")):
                return True
        return False

    # --- the tools ------------------------------------------------------------

    def list_files(self, path: str = ".") -> str:
        base = self.root / self.relative(path)
        if not base.exists():
            return f"{path} does not exist yet."
        if base.is_file():
            return self.relative(path)
        entries = []
        for current, dirs, files in os.walk(base):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                entries.append(str((Path(current) / name).relative_to(self.root)))
                if len(entries) >= MAX_LIST_ENTRIES:
                    return "\n".join(entries) + f"\n... (more than {MAX_LIST_ENTRIES} files)"
        return "\n".join(entries) if entries else "(no files)"

    def read_file(self, path: str) -> str:
        relative = self.relative(path)
        target = self.root / relative
        if not target.is_file():
            raise ToolError(f"{relative} is not a file of the workspace; list_files shows what there is.")
        data = target.read_bytes()[:MAX_READ_BYTES]
        return data.decode("utf-8", errors="replace")

    def write_file(self, path: str, content: Any) -> str:
        relative = self.relative(path)
        if relative == ".":
            raise ToolError("Give a file path, not the workspace itself.")
        if not isinstance(content, str):
            raise ToolError("`content` must be text.")
        if not self._covered_by_declared_write(relative) and relative not in self.locked:
            if self.lock_writer is not None:
                self.lock_writer(relative)
            self.locked.add(relative)
        target = self.root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        # Write a sibling file and rename it, so a reader never sees half a file.
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(content)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        if relative not in self.written:
            self.written.append(relative)
        return f"Wrote {len(content.encode())} bytes to {relative}."

    def run(self, tool: str, args: dict[str, Any]) -> str:
        if tool == "list_files":
            return self.list_files(args.get("path", "."))
        if tool == "read_file":
            return self.read_file(args.get("path"))
        if tool == "write_file":
            return self.write_file(args.get("path"), args.get("content"))
        raise ToolError(f"There is no tool {tool!r}; use one of: {', '.join(TOOL_DOCS)}.")
