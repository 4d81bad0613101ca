import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from coordination import workspace_reads
from coordination.errors import ServiceError
from coordination.paths import normalise_file_path
from coordination.services import workspace_archives

PROGRESS_EVERY = 500
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")


class Command(BaseCommand):
    help = (
        "Write a project's workspace (now, or as it was at --version) into a new or empty directory, or into a "
        ".tar.gz file (the same archive as GET /v1/projects/{project}/archive). Never writes outside PATH and "
        "never overwrites."
    )

    def create_parser(self, prog_name, subcommand, **kwargs):
        # `--version N` is the workspace's version here; it replaces Django's own `--version` (the later one wins).
        return super().create_parser(prog_name, subcommand, conflict_handler="resolve", **kwargs)

    def add_arguments(self, parser):
        parser.add_argument("project", help="The project's name.")
        parser.add_argument("path", help="A new or empty directory, or a new file ending .tar.gz or .tgz.")
        parser.add_argument("--version", type=int, default=None,
                            help="The workspace version to export (default: the latest).")

    def handle(self, *args, project, path, version, **options):
        target = Path(path)
        try:
            found = workspace_reads.project_get(name=project)
            version, files, contents = workspace_archives.workspace_contents(project=found, version=version)
        except ServiceError as exc:
            raise CommandError(f"{exc.detail} (see GET /v1/projects for the names and versions)") from None
        self.stdout.write(f"Exporting {len(files)} files of {found.name} at version {version} to {target}...")
        if target.name.lower().endswith(ARCHIVE_SUFFIXES):
            self._to_archive(target, len(files), contents)
        else:
            clash = workspace_archives.file_and_directory(entry["path"] for entry in files)
            if clash is not None:
                raise CommandError(f"{clash[0]} is a file and also holds {clash[1]} at version {version}: no directory "
                                   "can hold both; export to a .tar.gz instead.")
            self._to_directory(target, len(files), contents)
        self.stdout.write(f"Exported {len(files)} files of {found.name} at version {version} to {target}.")

    def _progress(self, done: int, count: int) -> None:
        if done % PROGRESS_EVERY == 0 and done < count:
            self.stdout.write(f"Wrote {done} of {count} files...")

    def _to_archive(self, target: Path, count: int, contents) -> None:
        """Into a temporary file beside the target, renamed once complete: a failure leaves no half archive."""
        if target.exists():
            raise CommandError(f"{target} exists: give a new file name, or remove it first (export never overwrites).")
        if not target.parent.is_dir():
            raise CommandError(f"{target.parent} is not a directory: create it first.")
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(handle, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as archive:
                for done, (entry, content) in enumerate(contents, start=1):
                    info = tarfile.TarInfo(name=entry["path"])
                    info.size = len(content)
                    info.mode = 0o644
                    info.mtime = int(entry["changed_at"].timestamp()) if entry["changed_at"] else int(time.time())
                    archive.addfile(info, io.BytesIO(content))
                    self._progress(done, count)
            # A link fails when the target appeared meanwhile, where a rename would replace it.
            os.link(temporary, target)
        except FileExistsError:
            raise CommandError(f"{target} appeared while exporting: give a new file name.") from None
        finally:
            os.unlink(temporary)

    def _to_directory(self, target: Path, count: int, contents) -> None:
        if target.exists() and not target.is_dir():
            raise CommandError(f"{target} exists and is not a directory: give a new or empty directory, or a name "
                               "ending .tar.gz.")
        if target.is_dir() and any(target.iterdir()):
            raise CommandError(f"{target} is not empty: give a new or empty directory (export never overwrites).")
        target.mkdir(parents=True, exist_ok=True)
        root = target.resolve()
        for done, (entry, content) in enumerate(contents, start=1):
            self._write_file(root, entry["path"], content)
            self._progress(done, count)

    def _write_file(self, root: Path, path: str, content: bytes) -> None:
        """One file under `root`, its path checked again, never through a link, never over an existing file."""
        if normalise_file_path(path) != path:
            raise CommandError(f"{path!r} is not a normalised workspace path; nothing more was written.")
        destination = root / path
        parent = destination.parent
        parent.mkdir(parents=True, exist_ok=True)
        if parent.resolve() != parent or not parent.is_relative_to(root):
            raise CommandError(f"{parent} leads outside {root} (through a link made meanwhile?); stopped.")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        try:
            descriptor = os.open(destination, flags, 0o644)
        except FileExistsError:
            raise CommandError(f"{destination} exists already (made meanwhile?); stopped.") from None
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
