"""Projects and their workspace (shared/api-v1.md, "Projects and their workspace"). Views validate and delegate."""

from __future__ import annotations

import base64
import binascii
import mimetypes
from uuid import UUID

from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions as drf_exceptions
from rest_framework import serializers as drf
from rest_framework import status
from rest_framework.response import Response

from coordination import selectors, workspace_reads
from coordination.api import serializers as s
from coordination.api.schema import (FILE_PATH_SCHEMA, INTO_SCHEMA, MAX_FENCING, PREFIX_SCHEMA, PROJECT_SCHEMA,
                                     documented)
from coordination.api.auth import CanSubmit, IsAuthenticated, request_agent
from coordination.api.views import (AUTH_ERRORS, BAD_REQUEST, MAX_SEQ, TOO_LARGE, APIBase, _error, _int_param,
                                    _no_store)
from coordination.errors import Forbidden, InvalidRequest
from coordination.models import Project
from coordination.paths import normalise_file_path
from coordination.services import projects, workspace, workspace_archives

PROJECT_NOT_FOUND = {404: _error("not_found: no such project (or file).")}
WRITE_ERRORS = {
    409: _error("lock_required (no write lock with this fencing number covers the path: acquire one) or "
                "stale_fencing (the lock expired, was released or was granted since; `current_fencing` given)."),
    412: _error("precondition_failed: If-Match / If-None-Match did not hold; the current `sha256` is given."),
    413: _error("too_large: above AM_MAX_FILE_BYTES (or the body limit)."),
    400: _error("invalid_path, or a malformed body or header."),
}


class ProjectOutSerializer(drf.Serializer):
    id = drf.UUIDField()
    name = drf.CharField()
    description = drf.CharField()
    version = drf.IntegerField(source="workspace_version", help_text="The workspace's version.")
    created_at = drf.DateTimeField()


class ProjectInSerializer(s.StrictSerializer):
    name = documented(s.StrictCharField(max_length=64), **PROJECT_SCHEMA)
    description = s.StrictCharField(max_length=10_000, required=False, allow_blank=True, default="")


class FileEntrySerializer(drf.Serializer):
    path = drf.CharField()
    size = drf.IntegerField()
    sha256 = drf.CharField()
    version = drf.IntegerField(help_text="The workspace version that last changed the file.")
    changed_at = drf.DateTimeField()
    agent = drf.CharField(allow_null=True, help_text="Who changed it: the agent's name, or the person's.")
    step_id = drf.UUIDField(allow_null=True)


class TreeSerializer(drf.Serializer):
    project = drf.CharField()
    version = drf.IntegerField()
    files = FileEntrySerializer(many=True)


class HistoryEntrySerializer(FileEntrySerializer):
    deleted = drf.BooleanField()
    fencing = drf.IntegerField(allow_null=True)


class HistorySerializer(drf.Serializer):
    project = drf.CharField()
    path = drf.CharField()
    versions = HistoryEntrySerializer(many=True)


class WrittenSerializer(drf.Serializer):
    path = drf.CharField()
    sha256 = drf.CharField(allow_blank=True)
    size = drf.IntegerField()
    version = drf.IntegerField()
    deleted = drf.BooleanField(required=False)


class BatchOutSerializer(drf.Serializer):
    project = drf.CharField()
    version = drf.IntegerField()
    files = WrittenSerializer(many=True)


class ChangeInSerializer(s.StrictSerializer):
    """One change: exactly one of `content`, `content_b64` (valid base64) or `delete: true`."""

    schema_extra = {"oneOf": [{"required": ["content"]}, {"required": ["content_b64"]},
                              {"required": ["delete"], "properties": {"delete": {"enum": [True]}}}]}

    path = documented(s.StrictCharField(max_length=1024, trim_whitespace=False), **FILE_PATH_SCHEMA)
    content = s.StrictCharField(required=False, allow_blank=True, trim_whitespace=False)
    content_b64 = documented(s.StrictCharField(required=False, allow_blank=True, trim_whitespace=False),
                             pattern=r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$")
    delete = s.StrictBooleanField(required=False, default=False)
    fencing = s.StrictIntegerField(min_value=1, max_value=MAX_FENCING)

    def validate(self, data):
        given = [name for name in ("content", "content_b64") if name in data] + (["delete"] if data["delete"] else [])
        if len(given) != 1:
            raise drf.ValidationError("Give exactly one of `content`, `content_b64` or `delete: true`.")
        return data


class BatchInSerializer(s.StrictSerializer):
    changes = documented(ChangeInSerializer(many=True, allow_empty=False,
                                            max_length=workspace.MAX_CHANGES_PER_BATCH), minItems=1,
                         description="One change per path: two changes naming the same path (once normalised, "
                                     "`a/./b` is `a/b`) are invalid_request, which OpenAPI cannot say.")


class StepChangeSerializer(drf.Serializer):
    project = drf.CharField()
    path = drf.CharField()
    version = drf.IntegerField()
    deleted = drf.BooleanField()
    sha256_before = drf.CharField(allow_null=True)
    sha256_after = drf.CharField(source="sha256", allow_blank=True)
    size = drf.IntegerField()
    changed_at = drf.DateTimeField()
    agent = drf.CharField(allow_null=True)
    fencing = drf.IntegerField(allow_null=True)
    binary = drf.BooleanField()
    diff = drf.CharField(allow_null=True, help_text="A unified diff, for text (null for binary or very large files).")


class StepChangesSerializer(drf.Serializer):
    step_id = drf.UUIDField()
    changes = StepChangeSerializer(many=True)


def _project_payload(project: Project) -> dict:
    return ProjectOutSerializer(project).data


class ProjectListView(APIBase):
    permission_classes = [IsAuthenticated, CanSubmit]

    @extend_schema(operation_id="list_projects", summary="Projects, by name",
                   responses={200: ProjectOutSerializer(many=True), **AUTH_ERRORS})
    def get(self, request):
        return Response([_project_payload(p) for p in Project.objects.order_by("name")])

    @extend_schema(operation_id="create_project", summary="Create a project (users, and agents allowed to submit)",
                   request=ProjectInSerializer,
                   responses={201: ProjectOutSerializer, 409: _error("conflict: a project with this name exists."),
                              **BAD_REQUEST, **AUTH_ERRORS})
    def post(self, request):
        body = ProjectInSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        agent = request_agent(request)
        project = projects.project_create(name=body.validated_data["name"],
                                          description=body.validated_data["description"],
                                          user=None if agent else request.user, agent=agent)
        return Response(_project_payload(project), status=status.HTTP_201_CREATED)


class ProjectDetailView(APIBase):
    @extend_schema(operation_id="get_project", summary="A project and its workspace version",
                   responses={200: ProjectOutSerializer, **AUTH_ERRORS, **PROJECT_NOT_FOUND})
    def get(self, request, project: str):
        return Response(_project_payload(workspace_reads.project_get(name=project)))


def _version_param(request) -> int | None:
    raw = request.query_params.get("version")
    return None if raw is None else _int_param(request, "version", 0, 0, MAX_SEQ)


VERSION_PARAM = OpenApiParameter("version", {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}, required=False,
                                 description="As it was at this workspace version (default: now). A version the "
                                             "workspace has not reached yet is invalid_request.")
PREFIX_PARAM = OpenApiParameter("prefix", PREFIX_SCHEMA, required=False,
                                description="Only paths starting with this text (e.g. `src/`); default: every file.")


def _prefix_param(request) -> str:
    prefix = request.query_params.get("prefix", "")
    if len(prefix) > PREFIX_SCHEMA["maxLength"]:
        raise InvalidRequest(f"prefix may be at most {PREFIX_SCHEMA['maxLength']} characters.")
    return prefix


class FilesView(APIBase):
    query_params_allowed = frozenset({"prefix", "version"})

    @extend_schema(operation_id="list_files", summary="The workspace's files now, or at a version",
                   parameters=[PREFIX_PARAM, VERSION_PARAM],
                   responses={200: TreeSerializer, **BAD_REQUEST, **AUTH_ERRORS, **PROJECT_NOT_FOUND})
    def get(self, request, project: str):
        prefix = _prefix_param(request)
        found = workspace_reads.project_get(name=project)
        version, files = workspace_reads.workspace_tree(project=found, prefix=prefix, version=_version_param(request))
        return _no_store(Response(TreeSerializer({"project": found.name, "version": version, "files": files}).data))


def _file_path(raw: str) -> str:
    return normalise_file_path(raw)


def _fencing(request) -> int | None:
    raw = request.headers.get("X-AM-Fencing")
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"X-AM-Fencing={raw!r} is not a whole number: send the lock's `fencing`.") from None
    if not 1 <= value <= MAX_FENCING:
        raise InvalidRequest(f"X-AM-Fencing is a lock's fencing number, 1 to {MAX_FENCING}.")
    return value


def _if_match(request) -> str | None:
    raw = request.headers.get("If-Match")
    if raw is None:
        return None
    return raw.strip().strip('"')


def _if_none_match_any(request) -> bool:
    raw = request.headers.get("If-None-Match")
    if raw is None:
        return False
    if raw.strip() != "*":
        raise InvalidRequest('A write takes `If-None-Match: *` (only if the file does not exist yet), nothing else.')
    return True


def _writer(request):
    agent = request_agent(request)
    if agent is None:
        raise Forbidden("Only agents write files, under their write locks; people seed a workspace with an archive "
                        "(POST /v1/projects/{project}/archive or manage.py workspace_import).")
    return agent


def _read_body(request, limit: int, setting: str = "AM_MAX_FILE_BYTES") -> bytes:
    """The raw request body, refused past `limit` bytes (files may be larger than AM_MAX_BODY_BYTES)."""
    length = request.META.get("CONTENT_LENGTH") or ""
    if length.isdigit() and int(length) > limit:
        raise workspace.TooLarge(f"The body is {length} bytes; the limit is {limit} ({setting}).", limit=limit)
    content = request._request.read(limit + 1)
    if len(content) > limit:
        raise workspace.TooLarge(f"The body is larger than {limit} bytes ({setting}).", limit=limit)
    return content


class FileView(APIBase):
    query_params_allowed = frozenset({"version"})
    parser_classes: list = []

    @extend_schema(
        operation_id="read_file", summary="A file's bytes, now or at a version",
        parameters=[VERSION_PARAM,
                    OpenApiParameter("If-None-Match", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
                                     description='`"<sha256>"`: 304 when the file is still that content.')],
        responses={(200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY,
                                                                      description="The bytes; ETag and X-AM-Version."),
                   304: OpenApiResponse(description="Not modified."), **BAD_REQUEST, **AUTH_ERRORS,
                   **PROJECT_NOT_FOUND})
    def get(self, request, project: str, path: str):
        found = workspace_reads.project_get(name=project)
        read = workspace_reads.workspace_file(project=found, path=_file_path(path), version=_version_param(request))
        etag = f'"{read.entry["sha256"]}"'
        if request.headers.get("If-None-Match", "").strip() in (etag, read.entry["sha256"]):
            response = HttpResponse(status=304)
        else:
            kind = mimetypes.guess_type(read.entry["path"])[0] or "application/octet-stream"
            response = HttpResponse(read.content, content_type=kind)
        response["ETag"] = etag
        response["X-AM-Version"] = str(read.entry["version"])
        response["Cache-Control"] = "no-cache"
        return response

    @extend_schema(
        operation_id="write_file", summary="Write a file under a write lock (its fencing number)",
        request={"application/octet-stream": OpenApiTypes.BINARY},
        parameters=[OpenApiParameter("X-AM-Fencing", OpenApiTypes.INT, OpenApiParameter.HEADER, required=True,
                                     description="The fencing number of a live write lock of yours covering the path."),
                    OpenApiParameter("If-Match", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
                                     description='`"<sha256>"`: only if the file is still that content.'),
                    OpenApiParameter("If-None-Match", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False,
                                     description="`*`: only if the file does not exist yet.")],
        responses={200: WrittenSerializer, **WRITE_ERRORS, **AUTH_ERRORS, **PROJECT_NOT_FOUND})
    def put(self, request, project: str, path: str):
        agent = _writer(request)
        change = workspace.Change(path=_file_path(path), content=_read_body(request, settings.AM_MAX_FILE_BYTES),
                                  fencing=_fencing(request))
        version, written = workspace.workspace_write(project_name=project, changes=[change], agent=agent,
                                                     if_match=_if_match(request),
                                                     if_none_match=_if_none_match_any(request))
        return _no_store(Response(WrittenSerializer(written[0].as_dict()).data))

    @extend_schema(
        operation_id="delete_file", summary="Delete a file under a write lock (its fencing number)",
        parameters=[OpenApiParameter("X-AM-Fencing", OpenApiTypes.INT, OpenApiParameter.HEADER, required=True),
                    OpenApiParameter("If-Match", OpenApiTypes.STR, OpenApiParameter.HEADER, required=False)],
        responses={200: WrittenSerializer, **WRITE_ERRORS, **AUTH_ERRORS, **PROJECT_NOT_FOUND})
    def delete(self, request, project: str, path: str):
        agent = _writer(request)
        change = workspace.Change(path=_file_path(path), content=None, fencing=_fencing(request))
        version, written = workspace.workspace_write(project_name=project, changes=[change], agent=agent,
                                                     if_match=_if_match(request))
        return _no_store(Response(WrittenSerializer(written[0].as_dict()).data))


class FileHistoryView(APIBase):
    query_params_allowed = frozenset({"limit"})

    @extend_schema(operation_id="file_history", summary="Every version of a file, newest first",
                   parameters=[OpenApiParameter("limit", {"type": "integer", "minimum": 1, "maximum": 1000},
                                                required=False)],
                   responses={200: HistorySerializer, **BAD_REQUEST, **AUTH_ERRORS, **PROJECT_NOT_FOUND})
    def get(self, request, project: str, path: str):
        found = workspace_reads.project_get(name=project)
        path = _file_path(path)
        history = workspace_reads.workspace_history(project=found, path=path,
                                                    limit=_int_param(request, "limit", 1000, 1, 1000))
        return _no_store(Response(HistorySerializer({"project": found.name, "path": path, "versions": history}).data))


class ChangesView(APIBase):
    @extend_schema(operation_id="write_files", summary="Several changes as one version, all or none",
                   request=BatchInSerializer,
                   responses={200: BatchOutSerializer, **WRITE_ERRORS, **AUTH_ERRORS, **PROJECT_NOT_FOUND, **TOO_LARGE})
    def post(self, request, project: str):
        agent = _writer(request)
        body = BatchInSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        changes = []
        for index, item in enumerate(body.validated_data["changes"]):
            if item["delete"]:
                content = None
            elif "content_b64" in item:
                try:
                    content = base64.b64decode(item["content_b64"], validate=True)
                except (binascii.Error, ValueError):
                    raise InvalidRequest(f"changes[{index}].content_b64 is not valid base64.") from None
            else:
                content = item["content"].encode("utf-8")
            changes.append(workspace.Change(path=item["path"], content=content, fencing=item["fencing"]))
        version, written = workspace.workspace_write(project_name=project, changes=changes, agent=agent)
        return _no_store(Response(BatchOutSerializer({"project": project, "version": version,
                                                      "files": [w.as_dict() for w in written]}).data))


class ImportedSerializer(drf.Serializer):
    project = drf.CharField()
    version = drf.IntegerField(help_text="The one workspace version the import made.")
    files = drf.IntegerField(help_text="How many files it wrote.")


# What each archive media type holds; application/octet-stream: told by its first bytes.
ARCHIVE_KINDS = {
    "application/gzip": "tar.gz",
    "application/x-gzip": "tar.gz",
    "application/x-tar": "tar",
    "application/zip": "zip",
    "application/x-zip-compressed": "zip",
    "application/octet-stream": "auto",
}
IMPORT_ERRORS = {
    400: _error("invalid_path (a member's path is absolute, climbs out with `..`, holds control characters or is "
                "too long; or `into` is such a path) or invalid_request (a link, device or fifo; a path twice; a "
                "file under a file; no files; not an archive, or a damaged or forged one; a malformed header); "
                "`detail` and `member` name the member."),
    403: _error("forbidden: only people and agents created with can_submit import archives."),
    404: _error("not_found: no such project."),
    409: _error("lock_required (an agent sent no X-AM-Fencing, or its lock does not cover every file), "
                "stale_fencing (the lock expired, was released or was granted since), or conflict (a person's "
                "import where an agent holds a live lock)."),
    413: _error("too_large: the body is over AM_MAX_ARCHIVE_BYTES, a file over AM_MAX_FILE_BYTES, more than "
                "AM_MAX_ARCHIVE_FILES files, or more than AM_MAX_ARCHIVE_BYTES once unpacked."),
    415: _error("unsupported_media_type: send one of the request body's media types (application/gzip, "
                "application/x-tar, application/zip, or application/octet-stream to have the kind told by the "
                "first bytes)."),
}


class ArchiveView(APIBase):
    permission_classes = [IsAuthenticated, CanSubmit]
    parser_classes: list = []

    def initial(self, request, *args, **kwargs):
        # A download reads `version` and `prefix`, an import `into`: either refuses the other's.
        self.query_params_allowed = frozenset({"into"} if request.method == "POST" else {"version", "prefix"})
        super().initial(request, *args, **kwargs)

    @extend_schema(operation_id="download_archive", summary="The tree (now or at a version) as a .tar.gz",
                   parameters=[VERSION_PARAM, PREFIX_PARAM],
                   responses={(200, "application/gzip"): OpenApiResponse(OpenApiTypes.BINARY),
                              **BAD_REQUEST, **AUTH_ERRORS, **PROJECT_NOT_FOUND})
    def get(self, request, project: str):
        found = workspace_reads.project_get(name=project)
        prefix = _prefix_param(request)
        version, chunks = workspace_reads.archive_chunks(project=found, prefix=prefix,
                                                         version=_version_param(request))
        response = StreamingHttpResponse(chunks, content_type="application/gzip")
        response["Content-Disposition"] = f'attachment; filename="{found.name}-v{version}.tar.gz"'
        response["X-AM-Version"] = str(version)
        return response

    @extend_schema(
        operation_id="import_archive",
        summary="Seed the workspace from an archive: every member checked first, then one version, all or none",
        description="People, and agents created with can_submit. An agent sends `X-AM-Fencing`: its live write lock "
                    "must cover every file written (a lock on `into`, or a directory above it). A person's import "
                    "is refused where an agent holds a live lock. Files not in the archive are kept. The body must "
                    "be a well-formed archive of that media type whose members are regular files with safe paths "
                    "(else invalid_request or invalid_path naming the `member`): OpenAPI cannot say that of bytes.",
        request={media_type: OpenApiTypes.BINARY for media_type in ARCHIVE_KINDS},
        parameters=[OpenApiParameter("into", INTO_SCHEMA, required=False,
                                     description="A directory to put every file under (e.g. `vendor/lib/`); "
                                                 "default: the workspace itself. A relative path, without `..` "
                                                 "parts, control characters or `\\`, else invalid_path."),
                    OpenApiParameter("X-AM-Fencing", OpenApiTypes.INT, OpenApiParameter.HEADER, required=False,
                                     description="Agents: the fencing number of a live write lock of yours covering "
                                                 "`into`.")],
        responses={200: ImportedSerializer, **AUTH_ERRORS, **IMPORT_ERRORS})
    def post(self, request, project: str):
        agent = request_agent(request)
        kind = ARCHIVE_KINDS.get(request.content_type.split(";")[0].strip().lower())
        if kind is None:
            raise drf_exceptions.UnsupportedMediaType(
                request.content_type, detail=f"Content-Type {request.content_type!r} is not an archive: send "
                "application/gzip (.tar.gz, .tgz), application/x-tar (.tar) or application/zip (.zip).")
        fencing = _fencing(request)
        into = request.query_params.get("into", "")
        body = _read_body(request, settings.AM_MAX_ARCHIVE_BYTES, "AM_MAX_ARCHIVE_BYTES")
        imported = workspace_archives.workspace_import(project_name=project, archive=body, kind=kind, into=into,
                                                       agent=agent, user=None if agent else request.user,
                                                       fencing=fencing)
        return _no_store(Response(ImportedSerializer(imported.as_dict()).data))


class StepChangesView(APIBase):
    @extend_schema(operation_id="step_changes", summary="The files a step's attempts changed, with diffs for text",
                   responses={200: StepChangesSerializer, **AUTH_ERRORS,
                              404: _error("not_found: no such step.")})
    def get(self, request, step_id: UUID):
        step = selectors.step_get(step_id=step_id)
        return _no_store(Response(StepChangesSerializer({"step_id": step.id,
                                                         "changes": workspace_reads.step_changes(step=step)}).data))

