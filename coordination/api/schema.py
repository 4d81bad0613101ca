"""What the OpenAPI schema says beyond what drf-spectacular reads off the serializers.

The schema must state every limit the server applies, so that a generated client
or validator is never told a falsehood:
- fields declare the rules their services check (slug patterns, path forms) with
  `documented(field, **schema)`, without moving the check (the error codes stay);
- request bodies of `StrictSerializer`s refuse unknown fields: `additionalProperties: false`, and state the
  rules between their fields that OpenAPI 3.0 can say (`schema_extra`: `anyOf`, `oneOf`); the rules it cannot
  say (a dependency naming a step that does not exist) are in their descriptions;
- a query parameter holding NUL is refused (PostgreSQL cannot compare it): every free-text one says so;
- answers any operation can give are added to every operation here, once:
  400 (an unknown query parameter, a NUL in one), 413 (a body over AM_MAX_BODY_BYTES),
  415 (a body that is not JSON) and 503 (`busy`, `database_unavailable`).
"""

from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.plumbing import ResolvedComponent

from coordination.models import KEY_PATTERN, ROLE_PATTERN

# A path as coordination.paths.normalise_path takes it: relative, no control character or backslash,
# not blank, no `..` part, not the workspace itself (`.`, `./.`) unless it ends with `/` (`./`).
PATH_PATTERN = r"^(?!/)(?!\s*$)(?!(?:.*/)?\.\.(?:/|$))(?!\.(?:/+\.)*$)[^\x00-\x1f\x7f\\]{1,1024}$"
# A file path (the workspace routes): the same, and not a directory (no trailing `/`).
FILE_PATH_PATTERN = r"^(?!.*/$)" + PATH_PATTERN[1:]
PROJECT_PATTERN = r"^[-a-zA-Z0-9_]{1,64}$"
# Roles of a pull: slugs separated by commas (spaces around them are allowed).
ROLES_PATTERN = r"^\s*[a-z0-9][a-z0-9_-]{0,63}\s*(?:,\s*[a-z0-9][a-z0-9_-]{0,63}\s*)*$"
# `into` of an archive import: "" (or `.`, `./`) for the workspace itself, else a directory that
# normalise_path takes once a `/` is added (so at most 1023 characters before that `/`).
INTO_PATTERN = r"^(?!/)(?!(?:.*/)?\.\.(?:/|$))(?:[^\x00-\x1f\x7f\\]{0,1023}|[^\x00-\x1f\x7f\\]{1023}/)$"
# Any query parameter holding NUL is refused (APIBase.initial).
NO_NUL = r"^[^\x00]*$"
# PostgreSQL's bigint: a number a column of that type holds (fencing numbers, token budgets); a larger one is
# refused (400) rather than overflow the column (500).
BIGINT_MAX = 2**63 - 1
MAX_FENCING = BIGINT_MAX
HOLDS_NUL = r"\x00"
PATH_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 1024, "pattern": PATH_PATTERN}
FILE_PATH_SCHEMA = {**PATH_SCHEMA, "pattern": FILE_PATH_PATTERN}
INTO_SCHEMA = {"type": "string", "maxLength": 1024, "pattern": INTO_PATTERN}
# A name to filter by: not empty (`?project=` would match nothing, so it is refused as a likely mistake).
FILTER_SCHEMA = {"type": "string", "minLength": 1, "pattern": NO_NUL}
# A prefix of workspace paths, compared as text ("" or absent: every file).
PREFIX_SCHEMA = {"type": "string", "maxLength": 1024, "pattern": NO_NUL}
PROJECT_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": PROJECT_PATTERN}
ROLE_SCHEMA = {"type": "string", "pattern": ROLE_PATTERN}
KEY_SCHEMA = {"type": "string", "pattern": KEY_PATTERN}
# Every text field refuses NUL (DRF's CharField; PostgreSQL cannot store it); one that trims whitespace and
# may not be blank also refuses text that is only whitespace: what Python's strip() removes, which is more than
# `\s` in a client's ECMAScript regex (the information separators U+001C-U+001F and NEL U+0085), so they are named.
NOT_BLANK = r"^[^\x00]*[^\x00\s\x1c-\x1f\x85][^\x00]*$"
# Path parameters, by name: Django's converters take more than the views accept.
PATH_PARAMETERS = {
    "project": {"type": "string", "pattern": r"^[-a-zA-Z0-9_]+$"},
    "path": FILE_PATH_SCHEMA,
    "role": {"type": "string", "pattern": ROLES_PATTERN},
}


def documented(field, **schema):
    """`field`, with `schema` merged into what drf-spectacular makes of it (the server's checks are unchanged)."""
    field.schema_extra = schema
    # DRF's serializers deep-copy their declared fields (re-instantiating them): the copy keeps the schema too.
    # (Request serializers copy them shallowly, `serializers._field_copy`, which keeps the attribute as it is.)
    copy_field = field.__deepcopy__
    field.__deepcopy__ = lambda memo: documented(copy_field(memo), **schema)
    return field


class DocumentedFieldExtension(OpenApiSerializerFieldExtension):
    """A field's `documented` schema; and for a text field of a request, the text DRF refuses (`_text_rule`)."""

    target_class = "rest_framework.fields.Field"
    match_subclasses = True
    priority = 1

    @classmethod
    def _matches(cls, target) -> bool:
        from rest_framework.fields import CharField

        return (bool(getattr(target, "schema_extra", None)) or isinstance(target, CharField)) and super()._matches(target)

    def map_serializer_field(self, auto_schema, direction):
        mapped = auto_schema._map_serializer_field(self.target, direction, bypass_extensions=True)
        mapped = {**mapped, **getattr(self.target, "schema_extra", {})}
        if direction == "request":
            mapped.update(_text_rule(self.target, mapped))
        return mapped


def _text_rule(field, mapped: dict) -> dict:
    """What DRF's CharField refuses beyond its lengths: NUL anywhere; blank (once trimmed) unless allowed."""
    from rest_framework.fields import CharField

    if not isinstance(field, CharField) or mapped.get("type") != "string" or {"pattern", "format", "enum"} & set(mapped):
        return {}
    if field.trim_whitespace and not field.allow_blank:
        return {"pattern": NOT_BLANK}
    # `not` rather than the pattern NO_NUL: a pattern makes generators draw the text from it, which cannot reach
    # a negated maxLength of MAX_TEXT (hypothesis refuses a million-character regex draw).
    return {"not": {"pattern": HOLDS_NUL}}


# Answers that hold a project: a link from each to every operation of that project, by `name` (its `id` is
# not what `{project}` takes; a client that guesses links by field names would pick it).
PROJECT_ANSWERS = {"create_project": "201", "get_project": "200"}
# Operations whose body is not a serializer's (drf-spectacular leaves those optional) but must be sent.
REQUIRED_BODIES = {"import_archive"}


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


COMMON_RESPONSES = {
    "400": _error("invalid_request: an unknown query parameter (each operation lists its own), or one holding NUL."),
    "503": _error("busy (retry after `Retry-After` seconds; nothing was changed) or database_unavailable."),
}
BODY_RESPONSES = {
    "413": _error("too_large: the body is larger than AM_MAX_BODY_BYTES."),
    "415": _error("unsupported_media_type: the body is not of a media type this operation takes."),
}


def postprocess(result, generator, request, public):
    """drf-spectacular postprocessing hook (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"])."""
    from coordination.api.serializers import StrictSerializer

    schemas = result.get("components", {}).get("schemas", {})
    for component in generator.registry._components.values():
        if component.type != ResolvedComponent.SCHEMA or component.name not in schemas:
            continue
        serializer = component.object
        serializer_class = serializer if isinstance(serializer, type) else type(serializer)
        if isinstance(serializer_class, type) and issubclass(serializer_class, StrictSerializer):
            schemas[component.name]["additionalProperties"] = False
            schemas[component.name].update(getattr(serializer_class, "schema_extra", {}))
    for path_item in result.get("paths", {}).values():
        for method, operation in path_item.items():
            if method not in {"get", "post", "put", "patch", "delete"}:
                continue
            for parameter in operation.get("parameters", []):
                if (parameter["in"] == "query" and parameter.get("schema", {}).get("type") == "string"
                        and "pattern" not in parameter["schema"] and "enum" not in parameter["schema"]):
                    parameter["schema"]["pattern"] = NO_NUL
                if parameter["in"] == "path" and parameter["name"] in PATH_PARAMETERS:
                    parameter["schema"] = dict(PATH_PARAMETERS[parameter["name"]])
                if parameter["in"] == "header" and parameter["name"] == "X-AM-Fencing":
                    parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": MAX_FENCING}
                if parameter["in"] == "header" and parameter["name"] == "If-None-Match" and method == "put":
                    parameter["schema"] = {"type": "string", "enum": ["*"]}
            if operation.get("operationId") in REQUIRED_BODIES:
                operation["requestBody"]["required"] = True
            responses = operation.setdefault("responses", {})
            extra = dict(COMMON_RESPONSES)
            if method in {"post", "put", "patch"}:
                extra.update(BODY_RESPONSES)
            for code, answer in extra.items():
                responses.setdefault(code, answer)
    _link_projects(result.get("paths", {}))
    return result


def _link_projects(paths: dict) -> None:
    operations = [operation for path_item in paths.values() for operation in path_item.values()
                  if isinstance(operation, dict) and "operationId" in operation]
    targets = [operation["operationId"] for operation in operations
               if any(p["in"] == "path" and p["name"] == "project" for p in operation.get("parameters", []))]
    for operation in operations:
        code = PROJECT_ANSWERS.get(operation["operationId"])
        if code is None:
            continue
        answer = operation["responses"][code]
        answer["links"] = {target: {"operationId": target, "parameters": {"project": "$response.body#/name"}}
                           for target in targets if target != operation["operationId"]}
