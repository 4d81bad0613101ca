"""Normalisation of workspace paths (file lock and declared-file paths).

A path is relative to the project's workspace, POSIX, normalised (`a/./b` is
`a/b`, `a//b` is `a/b`); a trailing `/` names a directory and everything under
it. Absolute paths, paths that climb out with `..`, empty paths, NUL bytes,
backslashes and over-long paths are refused with `InvalidPath`.
"""

import posixpath

from coordination.errors import InvalidPath

MAX_PATH_LENGTH = 1024


def normalise_path(raw: object) -> str:
    if not isinstance(raw, str):
        raise InvalidPath(f"A path must be a string, not {type(raw).__name__}.", path=repr(raw))
    if raw == "" or raw.strip() == "":
        raise InvalidPath("A path must not be empty.", path=raw)
    if "\x00" in raw:
        raise InvalidPath("A path must not contain a NUL byte.", path=raw.replace("\x00", "\\0"))
    if any(ord(char) < 32 or ord(char) == 127 for char in raw):
        raise InvalidPath("A path must not contain control characters (newlines, tabs...).",
                          path=raw.encode("unicode_escape").decode()[:200])
    if "\\" in raw:
        raise InvalidPath("Use '/' to separate path parts; '\\' is not allowed.", path=raw)
    if len(raw) > MAX_PATH_LENGTH:
        raise InvalidPath(f"A path may be at most {MAX_PATH_LENGTH} characters long.", path=raw[:80] + "...")
    if raw.startswith("/"):
        raise InvalidPath(f"{raw!r} is absolute: give a path relative to the project's workspace.", path=raw)
    is_directory = raw.endswith("/")
    if ".." in raw.split("/"):
        raise InvalidPath(f"{raw!r} climbs out with '..': give a path inside the workspace.", path=raw)
    normalised = posixpath.normpath(raw)
    if normalised in (".", ""):
        if is_directory:
            # "./" is the whole workspace.
            return "./"
        raise InvalidPath(f"{raw!r} names the workspace itself, not a file: use './' to lock all of it.", path=raw)
    return normalised + "/" if is_directory else normalised


def paths_overlap(a: str, b: str) -> bool:
    """Whether two normalised paths cover a common file (a directory covers all below it)."""
    if a == b or a == "./" or b == "./":
        return True
    # A directory covers everything below it, and a file of its own name too.
    if a.endswith("/") and (b.startswith(a) or b == a[:-1]):
        return True
    if b.endswith("/") and (a.startswith(b) or a == b[:-1]):
        return True
    return False


def normalise_file_path(raw: object) -> str:
    """A path that names one file of a workspace (not a directory, not the workspace itself)."""
    if isinstance(raw, str) and raw.endswith("/"):
        raise InvalidPath(f"{raw!r} names a directory: a file path does not end with '/'.", path=raw)
    return normalise_path(raw)


def covering_paths(path: str) -> list[str]:
    """The lock paths that cover a file path: itself, each directory above it, the whole workspace, and a
    directory lock of its own name (`a.py/`)."""
    parts = path.split("/")
    return ["./", *("/".join(parts[:depth]) + "/" for depth in range(1, len(parts))), path, path + "/"]

