"""Seeding a workspace from an archive: POST /v1/projects/{project}/archive, the workspace_import and
workspace_export commands, and every hostile archive refused with nothing stored."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
import warnings
import zipfile
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from coordination.errors import InvalidRequest
from coordination.management.commands import workspace_export
from coordination.models import Blob, Event, FileVersion, Project, WorkspaceFile
from coordination.services import projects, workspace, workspace_archives
from coordination.tests.workspace_agent import Worker

pytestmark = pytest.mark.django_db

TREE = {"README.md": b"# webapp\n", "src/app.py": b"print('hi')\n", "src/lib/util.py": b"x = 1\n",
        "img/logo.png": bytes(range(256)) * 4, "empty.txt": b""}


def _import(client: APIClient, body: bytes, content_type: str = "application/gzip", project: str = "webapp",
            query: str = "", fencing: int | None = None):
    extra = {"HTTP_X_AM_FENCING": str(fencing)} if fencing is not None else {}
    return client.generic("POST", f"/v1/projects/{project}/archive{query}", body, content_type=content_type, **extra)


def _info(name: str, content: bytes = b"", **fields) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, content


def _tar(*members, compression: str = "gz", format: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar from (name, bytes) pairs or (TarInfo, bytes) pairs, written as given (no sanitising)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}" if compression else "w", format=format) as archive:
        for name, content in members:
            info, data = (name, content) if isinstance(name, tarfile.TarInfo) else _info(name, content)
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def _zip(*members) -> bytes:
    """A zip from (name or ZipInfo, bytes) pairs, duplicates and all."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        warnings.simplefilter("ignore")  # "Duplicate name": the point of one test
        for name, content in members:
            archive.writestr(name, content)
    return buffer.getvalue()


def _zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def _zip_encrypted(name: str, content: bytes) -> bytes:
    """A zip whose one member is flagged encrypted in both of its headers (zipfile cannot write one)."""
    data = bytearray(_zip((name, content)))
    data[data.index(b"PK\x03\x04") + 6] |= 0x1
    data[data.index(b"PK\x01\x02") + 8] |= 0x1
    return bytes(data)


def _zip_declaring(content: bytes, declared: int) -> bytes:
    """A zip whose one member holds `content` but declares `declared` bytes, in both of its headers."""
    data = bytearray(_zip(("bomb.bin", content)))
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, local + 22, declared)
    struct.pack_into("<I", data, central + 24, declared)
    return bytes(data)


def _tree(project: str = "webapp") -> dict[str, bytes]:
    found = Project.objects.get(name=project)
    _, files, contents = workspace_archives.workspace_contents(project=found)
    return {entry["path"]: content for entry, content in contents}


def _nothing_stored(project: str = "webapp") -> None:
    assert not FileVersion.objects.exists() and not WorkspaceFile.objects.exists() and not Blob.objects.exists()
    assert Project.objects.get(name=project).workspace_version == 0


@pytest.fixture
def webapp(db) -> Project:
    return projects.project_create(name="webapp")


@pytest.fixture
def person(webapp) -> APIClient:
    """An owner of the workspace: a person, who imports without locks."""
    client = APIClient()
    client.force_authenticate(get_user_model().objects.create_user(username="ann", password="pw-ann-12345"))
    return client


@pytest.fixture
def pipeline(webapp) -> Worker:
    """A permitted agent: created with can_submit."""
    return Worker("pipeline", can_submit=True)


@pytest.fixture
def dev(webapp) -> Worker:
    """An agent that may write files under its locks but not import."""
    return Worker("dev-1")


class ImportTests:
    def test_a_person_imports_a_tar_gz_as_one_version(self, person):
        body = _tar(_info("src/", type=tarfile.DIRTYPE), *(("./" + path if path == "README.md" else path, content)
                                                              for path, content in TREE.items()))
        response = _import(person, body)
        assert response.status_code == 200, response.content
        assert response.json() == {"project": "webapp", "version": 1, "files": len(TREE)}
        assert _tree() == TREE
        assert set(FileVersion.objects.values_list("version", flat=True)) == {1}
        listed = person.get("/v1/projects/webapp/files").json()["files"]
        assert {f["agent"] for f in listed} == {"ann"}
        event = Event.objects.get(kind="files.changed")
        assert event.data["by_user"] == "ann" and sorted(event.data["paths"]) == sorted(TREE)

    def test_a_person_imports_a_zip_under_into_and_keeps_the_other_files(self, person):
        assert _import(person, _tar(("keep.txt", b"kept"))).status_code == 200
        body = _zip(("lib/", b""), ("lib/a.py", b"a = 1\n"), ("b.bin", b"\x00\xff"))
        response = _import(person, body, "application/zip", query="?into=vendor/pkg")
        assert response.status_code == 200, response.content
        assert response.json() == {"project": "webapp", "version": 2, "files": 2}
        assert _tree() == {"keep.txt": b"kept", "vendor/pkg/lib/a.py": b"a = 1\n", "vendor/pkg/b.bin": b"\x00\xff"}

    def test_the_kind_is_told_by_the_first_bytes_for_octet_stream(self, person):
        for body in (_tar(("a.txt", b"tar")), _tar(("a.txt", b"plain"), compression=""), _zip(("a.txt", b"zip"))):
            assert _import(person, body, "application/octet-stream").status_code == 200
        assert _tree() == {"a.txt": b"zip"}

    def test_an_agent_imports_under_its_write_lock(self, pipeline):
        lock = pipeline.lock("vendor/")[0]
        response = _import(pipeline.client, _tar(("a.py", b"a"), ("deep/b.py", b"b")), query="?into=vendor/",
                           fencing=lock["fencing"])
        assert response.status_code == 200, response.content
        versions = FileVersion.objects.order_by("path")
        assert [(v.path, v.agent_id, v.fencing) for v in versions] == [
            ("vendor/a.py", pipeline.agent.id, lock["fencing"]), ("vendor/deep/b.py", pipeline.agent.id, lock["fencing"])]

    def test_an_agent_whose_lock_does_not_cover_every_file_is_refused_whole(self, pipeline):
        lock = pipeline.lock("vendor/")[0]
        response = _import(pipeline.client, _tar(("vendor/a.py", b"a"), ("outside.py", b"b")),
                           fencing=lock["fencing"])
        assert response.status_code == 409 and response.json()["error"] == "lock_required", response.content
        assert response.json()["path"] == "outside.py"
        _nothing_stored()

    def test_an_agent_without_a_lock_is_lock_required_and_nothing_is_stored(self, pipeline):
        response = _import(pipeline.client, _tar(("a.py", b"a")), query="?into=src/")
        assert response.status_code == 409 and response.json()["error"] == "lock_required", response.content
        assert "src/" in response.json()["detail"]
        _nothing_stored()

    def test_an_agent_not_allowed_to_submit_is_forbidden(self, dev):
        fencing = dev.lock("./")[0]["fencing"]
        response = _import(dev.client, _tar(("a.py", b"a")), fencing=fencing)
        assert response.status_code == 403 and response.json()["error"] == "forbidden"
        _nothing_stored()

    @pytest.mark.parametrize("mode", ["write", "read"])
    def test_a_persons_import_is_refused_where_an_agent_holds_a_live_lock(self, person, dev, mode):
        dev.lock("src/app.py", mode=mode)
        response = _import(person, _tar(("README.md", b"r"), ("src/app.py", b"mine")))
        assert response.status_code == 409 and response.json()["error"] == "conflict", response.content
        assert "dev-1" in response.json()["detail"] and response.json()["path"] == "src/app.py"
        _nothing_stored()

    def test_more_files_than_one_batch_are_one_version_in_one_event(self, person):
        count = workspace.MAX_CHANGES_PER_BATCH + 200
        response = _import(person, _tar(*((f"f/{index:05}.txt", str(index).encode()) for index in range(count))))
        assert response.status_code == 200, response.content
        assert response.json()["files"] == count and response.json()["version"] == 1
        assert FileVersion.objects.filter(version=1).count() == count
        event = Event.objects.get(kind="files.changed")
        assert event.data["count"] == count and event.data["truncated"] is True
        assert len(event.data["paths"]) == workspace.EVENT_MAX_CHANGES

    def test_a_missing_project_a_wrong_type_a_bad_into_or_a_foreign_parameter_are_refused(self, person):
        body = _tar(("a.txt", b"a"))
        missing = _import(person, body, project="nope")
        assert missing.status_code == 404 and missing.json()["error"] == "not_found"
        wrong = _import(person, body, "text/plain")
        assert wrong.status_code == 415 and wrong.json()["error"] == "unsupported_media_type"
        assert "application/gzip" in wrong.json()["detail"]
        for into in ("../up/", "/abs/", "a%0Ab/"):
            climbing = _import(person, body, query=f"?into={into}")
            assert climbing.status_code == 400 and climbing.json()["error"] == "invalid_path", climbing.content
        assert _import(person, body, query="?version=1").status_code == 400
        assert person.get("/v1/projects/webapp/archive?into=x/").status_code == 400

    def test_a_body_over_the_archive_limit_is_too_large(self, person, settings):
        settings.AM_MAX_ARCHIVE_BYTES = 4096
        response = _import(person, os.urandom(5000))
        assert response.status_code == 413 and response.json()["error"] == "too_large"
        assert "AM_MAX_ARCHIVE_BYTES" in response.json()["detail"]
        _nothing_stored()


class RoundTripTests:
    def test_a_downloaded_archive_imports_as_the_same_tree_and_bytes(self, person, pipeline):
        fencing = pipeline.lock("./")[0]["fencing"]
        changes = [workspace.Change(path, content, fencing) for path, content in TREE.items()]
        workspace.workspace_write(project_name="webapp", changes=changes, agent=pipeline.agent)
        downloaded = b"".join(person.get("/v1/projects/webapp/archive").streaming_content)
        projects.project_create(name="mirror")
        response = _import(person, downloaded, project="mirror")
        assert response.status_code == 200, response.content
        assert _tree("mirror") == _tree("webapp") == TREE
        listing = {project: [(f["path"], f["sha256"], f["size"]) for f in
                             person.get(f"/v1/projects/{project}/files").json()["files"]]
                   for project in ("webapp", "mirror")}
        assert listing["webapp"] == listing["mirror"]


def _symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    return _info(name, type=tarfile.SYMTYPE, linkname=target)


HOSTILE = {
    "tar climbing out": (_tar(("ok.txt", b"ok"), ("../x", b"evil")), "application/gzip", 400, "invalid_path",
                         "climbs out"),
    "tar climbing out deeper": (_tar(("a/../../x", b"evil")), "application/gzip", 400, "invalid_path", "climbs out"),
    "tar absolute": (_tar(("/etc/x", b"evil")), "application/gzip", 400, "invalid_path", "absolute"),
    "zip climbing out": (_zip(("../x", b"evil")), "application/zip", 400, "invalid_path", "climbs out"),
    "zip absolute": (_zip(("/etc/x", b"evil")), "application/zip", 400, "invalid_path", "absolute"),
    "tar directory climbing out": (_tar(_info("../d/", type=tarfile.DIRTYPE)), "application/gzip", 400,
                                   "invalid_path", "climbs out"),
    "control character": (_tar(("a\nb.txt", b"x")), "application/gzip", 400, "invalid_path", "control"),
    "over-long path": (_tar(("d/" * 600 + "x", b"x")), "application/gzip", 400, "invalid_path", "1024"),
    "not UTF-8": (_tar(("caf\udce9.txt", b"x"), format=tarfile.GNU_FORMAT), "application/gzip", 400, "invalid_path",
                  "UTF-8"),
    "tar symlink": (_tar(("ok.txt", b"ok"), _symlink("passwd", "/etc/passwd")), "application/gzip", 400,
                    "invalid_request", "symbolic link"),
    "tar hardlink": (_tar(("ok.txt", b"ok"), _info("again", type=tarfile.LNKTYPE, linkname="ok.txt")),
                     "application/gzip", 400, "invalid_request", "hard link"),
    "tar device": (_tar(_info("dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3), compression=""),
                   "application/x-tar", 400,
                   "invalid_request", "device"),
    "tar fifo": (_tar(_info("pipe", type=tarfile.FIFOTYPE)), "application/gzip", 400, "invalid_request", "fifo"),
    "zip symlink": (_zip((_zip_info("passwd", stat.S_IFLNK | 0o777), b"/etc/passwd")), "application/zip", 400,
                    "invalid_request", "symbolic link"),
    "zip encrypted": (_zip_encrypted("secret.txt", b"x"), "application/zip", 400,
                      "invalid_request", "encrypted"),
    "tar member twice": (_tar(("a.txt", b"one"), ("a.txt", b"two")), "application/gzip", 400, "invalid_request",
                         "appear once"),
    "tar member twice through ./": (_tar(("a.txt", b"one"), ("./a.txt", b"two")), "application/gzip", 400,
                                    "invalid_request", "appear once"),
    "zip member twice": (_zip(("a.txt", b"one"), ("a.txt", b"two")), "application/zip", 400, "invalid_request",
                         "appear once"),
    "a file under a file": (_tar(("a", b"file"), ("a/b", b"under it")), "application/gzip", 400, "invalid_request",
                            "cannot be both"),
    "no files": (_tar(_info("only/", type=tarfile.DIRTYPE)), "application/gzip", 400, "invalid_request",
                 "holds no files"),
    "not gzip": (b"hello, I am not an archive at all", "application/gzip", 400, "invalid_request", "could not be read"),
    "not zip": (b"hello, I am not an archive at all", "application/zip", 400, "invalid_request", "could not be read"),
    "not tar": (b"hello, I am not an archive at all" * 40, "application/x-tar", 400, "invalid_request",
                "could not be read"),
    "not any archive": (b"hello, I am not an archive at all", "application/octet-stream", 400, "invalid_request",
                        "not an archive"),
    "truncated": (_tar(*((f"{i}.bin", os.urandom(2000)) for i in range(5)))[:5000], "application/gzip", 400,
                  "invalid_request", "could not be read"),
    "zip declaring fewer bytes than it holds": (_zip_declaring(b"\x00" * 1_000_000, 100), "application/zip", 400,
                                                "invalid_request", "damaged"),
    "zip declaring more bytes than the limit": (_zip_declaring(b"\x00" * 100, 0xFFFFFFF0), "application/zip", 413,
                                                "too_large", "AM_MAX_FILE_BYTES"),
}


class HostileArchiveTests:
    @pytest.mark.parametrize("case", list(HOSTILE))
    def test_it_is_refused_and_nothing_is_stored(self, person, case):
        body, content_type, status, code, words = HOSTILE[case]
        response = _import(person, body, content_type)
        assert response.status_code == status, response.content
        assert response.json()["error"] == code and words in response.json()["detail"], response.json()
        _nothing_stored()

    def test_a_refusal_names_the_member(self, person):
        response = _import(person, _tar(("fine.txt", b"ok"), _symlink("src/evil", "../../etc/shadow")))
        assert response.json()["member"] == "src/evil" and "src/evil is a symbolic link" in response.json()["detail"]

    def test_too_many_files(self, person, settings):
        settings.AM_MAX_ARCHIVE_FILES = 3
        response = _import(person, _tar(*((f"{index}.txt", b"x") for index in range(4))))
        assert response.status_code == 413 and response.json()["error"] == "too_large"
        assert "AM_MAX_ARCHIVE_FILES" in response.json()["detail"] and response.json()["member"] == "3.txt"
        _nothing_stored()

    def test_too_many_entries_even_if_they_are_directories(self, person, settings):
        settings.AM_MAX_ARCHIVE_FILES = 2
        response = _import(person, _tar(*(_info(f"d{index}/", type=tarfile.DIRTYPE) for index in range(10))))
        assert response.status_code == 413 and "entries" in response.json()["detail"]
        _nothing_stored()

    def test_too_many_bytes(self, person, settings):
        settings.AM_MAX_ARCHIVE_BYTES = 4096
        response = _import(person, _tar(*((f"{index}.txt", b"y" * 2000) for index in range(3))))
        assert response.status_code == 413 and response.json()["error"] == "too_large", response.content
        assert "AM_MAX_ARCHIVE_BYTES" in response.json()["detail"] and response.json()["member"] == "2.txt"
        _nothing_stored()

    def test_a_file_over_the_file_limit(self, person, settings):
        settings.AM_MAX_FILE_BYTES = 2048
        response = _import(person, _zip(("small.txt", b"s"), ("big.bin", b"z" * 4096)), "application/zip")
        assert response.status_code == 413 and "AM_MAX_FILE_BYTES" in response.json()["detail"]
        assert response.json()["member"] == "big.bin"
        _nothing_stored()

    def test_a_gzip_bomb_is_stopped_at_the_limit_not_unpacked(self, person, settings):
        settings.AM_MAX_ARCHIVE_BYTES = 1024 * 1024
        bomb = _tar(*((f"zeros{index:03}.bin", bytes(512 * 1024)) for index in range(64)))  # 32 MB unpacked
        assert len(bomb) < 64 * 1024
        # Its end cut off: a reader that went on past the limit would fail there, with a 400, instead.
        response = _import(person, bomb[: len(bomb) * 3 // 4])
        assert response.status_code == 413 and response.json()["member"] == "zeros002.bin", response.content
        assert "AM_MAX_ARCHIVE_BYTES" in response.json()["detail"]
        _nothing_stored()

    def test_a_tar_header_bomb_is_stopped_by_the_bound_on_the_unpacked_stream(self, person, settings):
        settings.AM_MAX_ARCHIVE_BYTES = 4096
        settings.AM_MAX_ARCHIVE_FILES = 1
        huge = tarfile.TarInfo("a.txt")
        huge.pax_headers = {"comment": "x" * 2_000_000}
        body = _tar((huge, b""))
        assert len(body) < 4096
        response = _import(person, body)
        assert response.status_code == 413 and "unpacks to more than" in response.json()["detail"]
        _nothing_stored()

    def test_a_declared_size_is_checked_before_anything_is_unpacked(self, person, settings):
        settings.AM_MAX_FILE_BYTES = 2048
        response = _import(person, _tar(("first.txt", b"1"), ("big.bin", b"b" * 100_000)))
        assert response.status_code == 413 and response.json()["member"] == "big.bin"
        assert "100000 bytes" in response.json()["detail"]


class SystemWriteTests:
    def test_a_system_write_is_neither_an_agent_nor_a_person(self, pipeline, webapp):
        change = workspace.Change("a.txt", b"a")
        with pytest.raises(InvalidRequest):
            workspace.workspace_write(project_name="webapp", changes=[change], agent=pipeline.agent, system=True)
        with pytest.raises(InvalidRequest):
            workspace.workspace_write(project_name="webapp", changes=[change])
        with pytest.raises(InvalidRequest):
            workspace_archives.workspace_import(project_name="webapp", archive=_tar(("a.txt", b"a")),
                                                agent=pipeline.agent, system=True, fencing=1)
        with pytest.raises(workspace.LockRequired):
            workspace_archives.workspace_import(project_name="webapp", archive=_tar(("a.txt", b"a")),
                                                agent=pipeline.agent)
        _nothing_stored()
        version, _ = workspace.workspace_write(project_name="webapp", changes=[change], system=True)
        written = FileVersion.objects.get()
        assert version == 1 and written.agent_id is None and written.user_id is None
        assert Event.objects.get(kind="files.changed").data["by"] == "system"


def _run(command: str, *args: str) -> str:
    out = StringIO()
    call_command(command, *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def source_dir(tmp_path):
    root = tmp_path / "source"
    for path, content in TREE.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)
    return root


class ImportCommandTests:
    def test_it_imports_a_directory_creating_the_project(self, db, source_dir, monkeypatch):
        monkeypatch.setattr(workspace_archives, "PROGRESS_EVERY", 2)
        (source_dir / ".git").mkdir()
        (source_dir / ".git" / "HEAD").write_bytes(b"ref: main\n")
        (source_dir / "src" / "app.pyc").write_bytes(b"\x00")
        out = _run("workspace_import", "fresh", str(source_dir), "--exclude", ".git", "--exclude", "*.pyc")
        assert _tree("fresh") == TREE
        assert "Read 2 files" in out and "Read 4 files" in out
        assert f"Imported {len(TREE)} files" in out and "workspace version 1" in out
        assert set(FileVersion.objects.values_list("agent", "user")) == {(None, None)}

    def test_it_imports_archives_under_into(self, webapp, tmp_path):
        (tmp_path / "seed.tar.gz").write_bytes(_tar(*TREE.items()))
        (tmp_path / "more.zip").write_bytes(_zip(("z.txt", b"zip")))
        _run("workspace_import", "webapp", str(tmp_path / "seed.tar.gz"))
        out = _run("workspace_import", "webapp", str(tmp_path / "more.zip"), "--into", "extra/")
        assert "workspace version 2" in out
        assert _tree() == {**TREE, "extra/z.txt": b"zip"}

    def test_its_errors_name_the_thing_and_the_fix(self, webapp, dev, tmp_path, source_dir):
        with pytest.raises(CommandError, match="does not exist: give a directory or an archive"):
            _run("workspace_import", "webapp", str(tmp_path / "missing"))
        with pytest.raises(CommandError, match="not a valid project name"):
            _run("workspace_import", "bad name!", str(source_dir))
        (source_dir / "link").symlink_to("/etc/passwd")
        with pytest.raises(CommandError, match="link is a symbolic link"):
            _run("workspace_import", "webapp", str(source_dir))
        (source_dir / "link").unlink()
        dev.lock("src/")
        with pytest.raises(CommandError, match=r"src/app.py is locked \(write\) by dev-1"):
            _run("workspace_import", "webapp", str(source_dir))
        (tmp_path / "not.tar.gz").write_bytes(b"plain text")
        with pytest.raises(CommandError, match="could not be read"):
            _run("workspace_import", "webapp", str(tmp_path / "not.tar.gz"))
        with pytest.raises(CommandError, match="--exclude applies to a directory"):
            _run("workspace_import", "webapp", str(tmp_path / "not.tar.gz"), "--exclude", "x")
        _nothing_stored()


class ExportCommandTests:
    @pytest.fixture
    def history(self, pipeline) -> int:
        """The tree written in two versions; the first version's number."""
        fencing = pipeline.lock("./")[0]["fencing"]
        first, _ = workspace.workspace_write(project_name="webapp", changes=[
            workspace.Change(path, content, fencing) for path, content in TREE.items()], agent=pipeline.agent)
        workspace.workspace_write(project_name="webapp", changes=[
            workspace.Change("README.md", b"changed", fencing), workspace.Change("empty.txt", None, fencing)],
            agent=pipeline.agent)
        return first

    def test_it_writes_a_directory_now_and_at_a_version(self, history, tmp_path, monkeypatch):
        monkeypatch.setattr(workspace_export, "PROGRESS_EVERY", 2)
        out = _run("workspace_export", "webapp", str(tmp_path / "now"))
        now = {**TREE, "README.md": b"changed"}
        del now["empty.txt"]
        assert _read_dir(tmp_path / "now") == now
        assert "Wrote 2 of 4 files" in out and "Exported 4 files of webapp at version 2" in out
        _run("workspace_export", "webapp", str(tmp_path / "then"), "--version", str(history))
        assert _read_dir(tmp_path / "then") == TREE

    def test_it_writes_a_tar_gz_that_imports_as_the_same_tree(self, history, tmp_path):
        _run("workspace_export", "webapp", str(tmp_path / "then.tar.gz"), "--version", str(history))
        with tarfile.open(tmp_path / "then.tar.gz") as archive:
            assert {m.name: archive.extractfile(m).read() for m in archive.getmembers()} == TREE
        assert [p.name for p in tmp_path.iterdir()] == ["then.tar.gz"], "no temporary file is left"
        _run("workspace_import", "copy", str(tmp_path / "then.tar.gz"))
        assert _tree("copy") == TREE

    def test_its_errors_name_the_thing_and_the_fix(self, history, tmp_path, pipeline):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "mine.txt").write_text("do not overwrite")
        with pytest.raises(CommandError, match="is not empty: give a new or empty directory"):
            _run("workspace_export", "webapp", str(tmp_path / "full"))
        (tmp_path / "old.tar.gz").write_bytes(b"old")
        with pytest.raises(CommandError, match="exists: give a new file name"):
            _run("workspace_export", "webapp", str(tmp_path / "old.tar.gz"))
        assert (tmp_path / "old.tar.gz").read_bytes() == b"old"
        with pytest.raises(CommandError, match="does not exist"):
            _run("workspace_export", "nope", str(tmp_path / "x"))
        with pytest.raises(CommandError, match="out of range"):
            _run("workspace_export", "webapp", str(tmp_path / "x"), "--version", "99")
        with pytest.raises(CommandError, match="create it first"):
            _run("workspace_export", "webapp", str(tmp_path / "no" / "such" / "dir.tar.gz"))
        fencing = pipeline.lock("./")[0]["fencing"]
        workspace.workspace_write(project_name="webapp", changes=[workspace.Change("src/app.py/inner", b"i", fencing)],
                                  agent=pipeline.agent)
        with pytest.raises(CommandError, match="export to a .tar.gz instead"):
            _run("workspace_export", "webapp", str(tmp_path / "clash"))
        assert not (tmp_path / "clash").exists() and not (tmp_path / "x").exists()


def _read_dir(root) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*") if path.is_file()}
