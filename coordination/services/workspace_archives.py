"""Seeding a workspace from an archive (.tar.gz, .tar, .zip) or a directory, read as hostile input.

1. Every member is checked as it is read, before anything is stored: its name
   must be UTF-8 and a normalised workspace path (`normalise_file_path`: not
   absolute, no `..`, no NUL or control characters, not over-long), under the
   `into` prefix; links (symbolic and hard), devices, fifos, sockets, sparse and
   encrypted members are refused; directories are skipped; no path twice, and no
   path both a file and a directory.
2. Sizes are counted on the bytes as they come out of the decompressor, never
   only on what a header declares: each file within `AM_MAX_FILE_BYTES`, at most
   `AM_MAX_ARCHIVE_FILES` files and `AM_MAX_ARCHIVE_BYTES` bytes in all, and a
   tar's decompressed stream bounded as a whole (headers included), so a zip or
   gzip bomb stops at the limit. A member whose content differs from its declared
   size or checksum is refused.
3. Only then is everything written, as ONE workspace version, through
   `workspace.workspace_write`: an agent's import is fenced (every file must be
   covered by the agent's live write lock named by `fencing`); a person's or the
   system's is refused where agents hold live locks. The write is one
   transaction, however many files (`max_changes` lifts the per-request batch
   cap: the archive limits above bound an import instead).

A refused archive stores nothing: the checks end before the write's transaction
begins, and the write is all or none.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import io
import lzma
import os
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser

from coordination.errors import InvalidPath, InvalidRequest, NotFound
from coordination.models import Agent, Blob, Project
from coordination.paths import normalise_file_path, normalise_path
from coordination.services import workspace
from coordination.services.workspace import Change, LockRequired, TooLarge

KINDS = ("auto", "tar.gz", "tar", "zip")
READ_CHUNK = 64 * 1024
# Room a tar may take beyond its files' contents for each entry (header, long-name or pax header, padding).
TAR_OVERHEAD_PER_ENTRY = 4096
# Entries (files and directories) an archive may list: directories are free but not unlimited.
ENTRIES_PER_FILE = 2
PROGRESS_EVERY = 500

# Whatever the readers raise on a damaged or malicious archive (BadGzipFile is an OSError).
ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, lzma.LZMAError, EOFError,
                  OSError, NotImplementedError, ValueError, struct.error)

_REFUSED_KINDS = {
    "symlink": "a symbolic link",
    "hardlink": "a hard link",
    "device": "a device",
    "fifo": "a fifo",
    "socket": "a socket",
    "sparse": "a sparse file",
    "encrypted": "encrypted",
    "other": "not a regular file (an unknown member type)",
}


@dataclass
class Member:
    """One entry of an archive or directory, as its reader names it, before any check."""

    name: str
    kind: str  # file, directory, or one of _REFUSED_KINDS
    size: int | None  # the size a file declares (its header's), checked again against what it holds
    open: Callable[[], IO[bytes]]


@dataclass
class Imported:
    project: str
    version: int
    files: int
    size: int

    def as_dict(self) -> dict[str, Any]:
        return {"project": self.project, "version": self.version, "files": self.files}


@dataclass(frozen=True)
class _Limits:
    files: int
    total: int
    file: int

    @classmethod
    def from_settings(cls) -> _Limits:
        return cls(files=settings.AM_MAX_ARCHIVE_FILES, total=settings.AM_MAX_ARCHIVE_BYTES,
                   file=settings.AM_MAX_FILE_BYTES)

    @property
    def entries(self) -> int:
        return self.files * ENTRIES_PER_FILE

    @property
    def stream(self) -> int:
        """Decompressed bytes a tar may take: its files' limit and room for every entry's headers."""
        return self.total + TAR_OVERHEAD_PER_ENTRY * (self.entries + 16)


def workspace_import(*, project_name: str, archive: bytes | BinaryIO | os.PathLike | str, kind: str = "auto",
                     into: str = "", agent: Agent | None = None, user: AbstractBaseUser | None = None,
                     system: bool = False, fencing: int | None = None, exclude: Sequence[str] = (),
                     progress: Callable[[str], None] | None = None) -> Imported:
    """Check every member of an archive (or a directory), then write all its files as one workspace version.

    `archive` is the archive's bytes, a seekable binary file, or a path to an
    archive file or to a directory (`exclude`: name patterns a directory walk
    skips, such as `.git`). `kind` is `tar.gz` (also .tgz), `tar`, `zip`, or
    `auto` (by its first bytes; .tar.bz2 and .tar.xz too). `into` is a directory
    prefix for every path. Exactly one of `agent` (fenced by `fencing`), `user`
    or `system=True` writes it (see `workspace.workspace_write`).
    """
    if kind not in KINDS:
        raise InvalidRequest(f"kind={kind!r} is not one of: {', '.join(KINDS)}.")
    if system and (agent is not None or user is not None):
        raise InvalidRequest("A system import is made by no agent and no person.")
    if agent is None and user is None and not system:
        raise InvalidRequest("An import is made by an agent, a person or the system.")
    prefix = _prefix(into)
    if not Project.objects.filter(name=project_name).exists():
        raise NotFound(f"Project {project_name!r} does not exist: check the name (workflows and POST /v1/projects "
                       "create projects).")
    if agent is not None and fencing is None:
        # Refused before an archive is unpacked: the write would refuse it anyway.
        raise LockRequired(f"Importing into {prefix or 'the workspace'} needs the fencing number of your write lock "
                           f"covering {prefix or './'} (X-AM-Fencing): acquire one with POST /v1/locks first.",
                           path=prefix or "./")
    say = progress or (lambda line: None)
    limits = _Limits.from_settings()
    members, described = _members(archive, kind, limits, exclude)
    try:
        contents = _checked_contents(members, described=described, prefix=prefix, limits=limits, say=say)
    finally:
        members.close()  # the archive's readers and file, at once, even when a member was refused
    total = sum(len(content) for content in contents.values())
    say(f"Checked {len(contents)} files ({_megabytes(total)}); writing them as one version...")
    changes = [Change(path=path, content=content, fencing=fencing if agent is not None else None)
               for path, content in contents.items()]
    version, written = workspace.workspace_write(project_name=project_name, changes=changes, agent=agent, user=user,
                                                 system=system, max_changes=limits.files)
    return Imported(project=project_name, version=version, files=len(written), size=total)


def _prefix(into: str) -> str:
    """`into` as a directory prefix ("" for the workspace itself); `InvalidPath` when it leaves the workspace."""
    if not isinstance(into, str):
        raise InvalidPath("into must be a directory path.", path=repr(into))
    if into in ("", ".", "./"):
        return ""
    normalised = normalise_path(into if into.endswith("/") else into + "/")
    return "" if normalised == "./" else normalised


def _label(name: str) -> str:
    """A member's name fit for a message: control characters escaped, cut at 200 characters."""
    shown = "".join(char if char.isprintable() else repr(char)[1:-1] for char in name)
    return shown if len(shown) <= 200 else shown[:200] + "..."


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


def _members(archive: bytes | BinaryIO | os.PathLike | str, kind: str, limits: _Limits,
             exclude: Sequence[str]) -> tuple[Iterator[Member], str]:
    """The archive's (or directory's) members, read lazily, and what to call the source in messages."""
    if isinstance(archive, (str, os.PathLike)):
        path = Path(archive)
        if path.is_dir():
            return _directory_members(path, exclude), f"the directory {path}"
        handle = path.open("rb")
        return _closing(handle, _archive_members(handle, kind, limits)), f"the archive {path.name}"
    stream = io.BytesIO(archive) if isinstance(archive, (bytes, bytearray, memoryview)) else archive
    return _archive_members(stream, kind, limits), "the archive"


def _closing(handle: IO[bytes], members: Iterator[Member]) -> Iterator[Member]:
    with handle:
        yield from members


def _sniff(stream: BinaryIO) -> str:
    head = stream.read(512)
    stream.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"BZh"):
        return "tar.bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "tar.xz"
    if head[257:262] == b"ustar":
        return "tar"
    raise InvalidRequest("This is not an archive AM reads: send a .tar.gz (or .tgz), .tar or .zip; nothing was stored.")


def _archive_members(stream: BinaryIO, kind: str, limits: _Limits) -> Iterator[Member]:
    if kind == "auto":
        kind = _sniff(stream)
    if kind == "zip":
        yield from _zip_members(stream, limits)
        return
    if kind == "tar.gz":
        unpacked = gzip.GzipFile(fileobj=stream, mode="rb")
    elif kind == "tar.bz2":
        unpacked = bz2.BZ2File(stream, mode="rb")
    elif kind == "tar.xz":
        unpacked = lzma.LZMAFile(stream, mode="rb")
    else:
        unpacked = stream
    yield from _tar_members(_BoundedReader(unpacked, limits.stream), limits)


class _BoundedReader(io.RawIOBase):
    """A decompressed stream that refuses to yield more than `limit` bytes (a bomb stops here)."""

    def __init__(self, inner: IO[bytes], limit: int) -> None:
        self.inner = inner
        self.limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(READ_CHUNK), b""))
        data = self.inner.read(min(size, self.limit - self.count + 1))
        self.count += len(data)
        if self.count > self.limit:
            raise TooLarge(f"The archive unpacks to more than {self.limit} bytes (AM_MAX_ARCHIVE_BYTES and room for "
                           "its headers): it is a compression bomb, or too large; nothing was stored.",
                           limit=self.limit)
        return data


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issparse():
        return "sparse"
    if info.isreg():
        return "file"
    if info.isdir():
        return "directory"
    if info.issym():
        return "symlink"
    if info.islnk():
        return "hardlink"
    if info.ischr() or info.isblk():
        return "device"
    if info.isfifo():
        return "fifo"
    return "other"


def _tar_members(stream: IO[bytes], limits: _Limits) -> Iterator[Member]:
    # Stream mode ("r|"): no seeking, every byte passes through the bounded reader, once.
    with tarfile.open(fileobj=stream, mode="r|") as archive:
        entries = 0
        for info in archive:
            entries += 1
            if entries > limits.entries:
                raise _too_many_entries(info.name, limits)
            kind = _tar_kind(info)
            yield Member(name=info.name, kind=kind, size=info.size if kind == "file" else None,
                         open=lambda info=info: archive.extractfile(info))


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    kind = {stat.S_IFLNK: "symlink", stat.S_IFCHR: "device", stat.S_IFBLK: "device", stat.S_IFIFO: "fifo",
            stat.S_IFSOCK: "socket", stat.S_IFDIR: "directory"}.get(stat.S_IFMT(mode))
    if kind is not None:
        return kind
    if info.is_dir():
        return "directory"
    if info.flag_bits & 0x1:
        return "encrypted"
    return "file"


def _zip_members(stream: BinaryIO, limits: _Limits) -> Iterator[Member]:
    with zipfile.ZipFile(stream) as archive:
        infos = archive.infolist()
        if len(infos) > limits.entries:
            raise _too_many_entries(infos[limits.entries].filename, limits)
        for info in infos:
            kind = _zip_kind(info)
            yield Member(name=info.filename, kind=kind, size=info.file_size if kind == "file" else None,
                         open=lambda info=info: archive.open(info))


def _too_many_entries(name: str, limits: _Limits) -> TooLarge:
    return TooLarge(f"The archive lists more than {limits.entries} entries (files and directories; "
                    f"{ENTRIES_PER_FILE} x AM_MAX_ARCHIVE_FILES) at {_label(name)}; nothing was stored.",
                    member=_label(name), limit=limits.entries)


def _excluded(relative: str, name: str, patterns: Sequence[str]) -> bool:
    """A pattern with a '/' matches the path from the directory; one without, any single name (`.git`, `*.pyc`)."""
    return any(fnmatch.fnmatchcase(relative if "/" in pattern else name, pattern.rstrip("/")) for pattern in patterns)


def _directory_members(root: Path, exclude: Sequence[str], relative: str = "") -> Iterator[Member]:
    """A directory's entries, depth first, by name; links are reported as links, never followed."""
    with os.scandir(root / relative if relative else root) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        name = relative + entry.name
        if _excluded(name, entry.name, exclude):
            continue
        mode = entry.stat(follow_symlinks=False).st_mode
        if stat.S_ISDIR(mode):
            yield Member(name=name + "/", kind="directory", size=None, open=lambda: io.BytesIO())
            yield from _directory_members(root, exclude, name + "/")
            continue
        kind = ("file" if stat.S_ISREG(mode) else "symlink" if stat.S_ISLNK(mode) else "fifo" if stat.S_ISFIFO(mode)
                else "socket" if stat.S_ISSOCK(mode) else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "other")
        # A directory's file may still grow while it is read: its size is not declared, only counted.
        yield Member(name=name, kind=kind, size=None, open=lambda path=entry.path: open(path, "rb"))


def _checked_contents(members: Iterator[Member], *, described: str, prefix: str, limits: _Limits,
                      say: Callable[[str], None]) -> dict[str, bytes]:
    """Every file's path and bytes, each checked (see the module's rules); a refusal names the member and the rule."""
    contents: dict[str, bytes] = {}
    names: dict[str, str] = {}
    total = 0
    last = "its start"
    while True:
        try:
            member = next(members)
        except StopIteration:
            break
        except ARCHIVE_ERRORS as exc:
            raise _unreadable(described, f"after {last}", exc) from None
        label = last = _label(member.name)
        _check_name(member, label)
        if member.kind == "directory":
            _member_path(member.name, prefix, label, directory=True)
            continue
        if member.kind != "file":
            raise InvalidRequest(f"{label} is {_REFUSED_KINDS[member.kind]}: {described} may hold only regular files "
                                 "and directories; nothing was stored.", member=label)
        path = _member_path(member.name, prefix, label)
        if path in contents:
            raise InvalidRequest(f"{label} is {path}, and {names[path]} is too: a path may appear once in "
                                 f"{described}; nothing was stored.", member=label, path=path)
        if len(contents) >= limits.files:
            raise TooLarge(f"{described.capitalize()} holds more than {limits.files} files (AM_MAX_ARCHIVE_FILES), "
                           f"counted up to {label}: split it up; nothing was stored.", member=label, limit=limits.files)
        if member.size is not None:
            _check_sizes(label, member.size, total, limits)
        try:
            content = _read(member, label, total, limits)
        except ARCHIVE_ERRORS as exc:
            raise _unreadable(described, f"at {label}", exc) from None
        contents[path] = content
        names[path] = label
        total += len(content)
        if len(contents) % PROGRESS_EVERY == 0:
            say(f"Read {len(contents)} files ({_megabytes(total)})...")
    if not contents:
        raise InvalidRequest(f"{described.capitalize()} holds no files; nothing was stored.")
    clash = file_and_directory(contents)
    if clash is not None:
        parent, path = clash
        raise InvalidRequest(f"{names[parent]} is a file, and {names[path]} puts a file under it: a path cannot be "
                             "both; nothing was stored.", member=names[path], path=parent)
    return contents


def _check_name(member: Member, label: str) -> None:
    try:
        member.name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPath(f"{label}: a path must be UTF-8; nothing was stored.", member=label, path=label) from None


def _member_path(name: str, prefix: str, label: str, *, directory: bool = False) -> str:
    """The workspace path of a member (its name normalised, under `prefix`); `InvalidPath` naming the member."""
    try:
        if directory:
            normalise_path(name if name.endswith("/") else name + "/")
            return ""
        return normalise_file_path(prefix + normalise_file_path(name))
    except InvalidPath as exc:
        raise InvalidPath(f"{label}: {exc.detail} Nothing was stored.", member=label,
                          **{k: v for k, v in exc.extra.items() if k != "member"}) from None


def _check_sizes(label: str, size: int, total: int, limits: _Limits) -> None:
    if size > limits.file:
        raise TooLarge(f"{label} is {size} bytes; a file may be at most {limits.file} (AM_MAX_FILE_BYTES); nothing "
                       "was stored.", member=label, limit=limits.file)
    if total + size > limits.total:
        raise TooLarge(f"With {label} the files come to more than {limits.total} bytes (AM_MAX_ARCHIVE_BYTES): split "
                       "the archive up; nothing was stored.", member=label, limit=limits.total)


def _read(member: Member, label: str, total: int, limits: _Limits) -> bytes:
    """The member's bytes, counted as they come (a declared size is never trusted), checked against its header."""
    chunks = []
    size = 0
    with member.open() as handle:
        while chunk := handle.read(READ_CHUNK):
            size += len(chunk)
            _check_sizes(label, size, total, limits)
            chunks.append(chunk)
    if member.size is not None and size != member.size:
        raise InvalidRequest(f"{label} declares {member.size} bytes but holds {size}: the archive is damaged or "
                             "forged; nothing was stored.", member=label)
    return b"".join(chunks)


def _unreadable(described: str, where: str, exc: BaseException) -> InvalidRequest:
    return InvalidRequest(f"{described.capitalize()} could not be read ({where}: {str(exc) or type(exc).__name__}): it is "
                          "damaged, forged or not an archive of the kind sent; nothing was stored.")


def file_and_directory(paths: Iterable[str]) -> tuple[str, str] | None:
    """A path that is a file and also a directory of another (a tree no file system holds): (it, the other)."""
    paths = paths if isinstance(paths, (set, dict)) else set(paths)
    for path in paths:
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent in paths:
                return parent, path
    return None


def workspace_contents(*, project: Project, version: int | None = None,
                       batch: int = 200) -> tuple[int, list[dict], Iterator[tuple[dict, bytes]]]:
    """The tree (now or at `version`) and an iterator over each file's entry and bytes, contents read by batch.

    A read for `workspace_export`, beside the import it mirrors.
    """
    from coordination import workspace_reads

    at, files = workspace_reads.workspace_tree(project=project, version=version)

    def generate() -> Iterator[tuple[dict, bytes]]:
        for start in range(0, len(files), batch):
            entries = files[start:start + batch]
            blobs = {blob.sha256: blob for blob in Blob.objects.filter(sha256__in=[e["sha256"] for e in entries])}
            for entry in entries:
                yield entry, workspace.blob_bytes(blobs[entry["sha256"]])

    return at, files, generate()
