from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from coordination.errors import ServiceError
from coordination.services import projects, workspace_archives

KINDS_BY_SUFFIX = {".tar.gz": "tar.gz", ".tgz": "tar.gz", ".tar": "tar", ".zip": "zip"}


class Command(BaseCommand):
    help = (
        "Seed a project's workspace from a directory or an archive (.tar.gz, .tgz, .tar, .zip), as one version. "
        "Every file is checked first (paths, links, sizes, AM_MAX_ARCHIVE_FILES, AM_MAX_ARCHIVE_BYTES, "
        "AM_MAX_FILE_BYTES); nothing is stored unless all pass. The project is created when missing. The write is "
        "the system's: refused where an agent holds a live lock on a path it writes."
    )

    def add_arguments(self, parser):
        parser.add_argument("project", help="The project's name; created when missing.")
        parser.add_argument("path", help="A directory, or an archive file (.tar.gz, .tgz, .tar, .zip).")
        parser.add_argument("--into", default="", help="A directory to put every file under, e.g. vendor/lib/.")
        parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                            help="Directories only: skip entries matching PATTERN (a name such as .git or *.pyc, or "
                                 "a path with '/' from the directory); repeat it for several.")

    def handle(self, *args, project, path, into, exclude, **options):
        source = Path(path)
        if not source.exists():
            raise CommandError(f"{source} does not exist: give a directory or an archive (.tar.gz, .tgz, .tar, .zip).")
        if not source.is_dir() and not source.is_file():
            raise CommandError(f"{source} is neither a directory nor a file: give a directory or an archive.")
        if source.is_file() and exclude:
            raise CommandError("--exclude applies to a directory; an archive is imported whole.")
        kind = next((kind for suffix, kind in KINDS_BY_SUFFIX.items() if source.name.lower().endswith(suffix)), "auto")
        try:
            found = projects.project_get_or_create(name=project)
            self.stdout.write(f"Importing {source} into {found.name}{' under ' + into if into else ''}...")
            imported = workspace_archives.workspace_import(
                project_name=found.name, archive=source, kind=kind, into=into, system=True, exclude=exclude,
                progress=self.stdout.write)
        except PermissionError as exc:
            raise CommandError(f"{exc.filename or source} cannot be read ({exc.strerror}): fix its permissions or "
                               "--exclude it.") from None
        except ServiceError as exc:
            raise CommandError(f"{exc.detail} ({source})") from None
        self.stdout.write(f"Imported {imported.files} files ({imported.size} bytes) into {imported.project}: "
                          f"workspace version {imported.version}.")
