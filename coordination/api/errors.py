"""Every API error as `{"error": "<code>", "detail": "<sentence>", ...}`, never a 500 for bad input."""

import logging

from django.core.exceptions import RequestDataTooBig
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404, JsonResponse
from rest_framework import exceptions
from rest_framework.response import Response

from coordination import db_errors
from coordination.errors import ServiceError

logger = logging.getLogger(__name__)

_CODES = {
    exceptions.ParseError: "invalid_json",
    exceptions.NotAuthenticated: "unauthenticated",
    exceptions.AuthenticationFailed: "unauthenticated",
    exceptions.PermissionDenied: "forbidden",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "throttled",
}


def _first_message(errors, path: str = "") -> str:
    if isinstance(errors, dict):
        for key, value in errors.items():
            where = key if key != "non_field_errors" else ""
            return _first_message(value, f"{path}.{where}" if path and where else (where or path))
    if isinstance(errors, list) and errors:
        first = errors[0]
        if isinstance(first, (dict, list)):
            index = next((i for i, e in enumerate(errors) if e), 0)
            return _first_message(errors[index], f"{path}[{index}]")
        return f"{path}: {first}" if path else str(first)
    return f"{path}: {errors}" if path else str(errors)


def _response(code: str, detail: str, http_status: int, **extra) -> Response:
    response = Response({"error": code, "detail": detail, **extra}, status=http_status)
    response["Cache-Control"] = "no-store"
    return response


def exception_handler(exc, context):
    if isinstance(exc, ServiceError):
        response = _response(exc.code, exc.detail, exc.status, **exc.extra)
        if exc.status == 503:
            response["Retry-After"] = "2"
        return response
    if isinstance(exc, Http404):
        return _response("not_found", "Nothing exists at this address: check the id.", 404)
    if isinstance(exc, RequestDataTooBig):
        return _response("too_large", "The request body is larger than the server accepts (AM_MAX_BODY_BYTES).", 413)
    if isinstance(exc, exceptions.ValidationError):
        return _response("invalid_request", _first_message(exc.detail), 400, errors=exc.detail)
    if isinstance(exc, exceptions.APIException):
        code = _CODES.get(type(exc)) or next((c for t, c in _CODES.items() if isinstance(exc, t)), "error")
        response = _response(code, str(exc.detail), exc.status_code)
        if isinstance(exc, exceptions.Throttled) and exc.wait:
            response["Retry-After"] = str(int(exc.wait))
        if getattr(exc, "auth_header", None):
            response["WWW-Authenticate"] = exc.auth_header
        return response
    if isinstance(exc, (OperationalError, InterfaceError)):
        answer = db_errors.explain(exc)
        logger.warning("%s: %s", answer.code, exc)
        response = _response(answer.code, answer.detail, answer.status, **answer.extra)
        response["Retry-After"] = "2"
        return response
    if isinstance(exc, DatabaseError):
        logger.exception("Database error")
        return _response("database_error", "The database refused the request; nothing was changed.", 500)
    return None


def json_not_found(request, exception=None):
    """404 for any unknown address under /v1, in the API's error shape."""
    return JsonResponse({"error": "not_found", "detail": f"No API endpoint at {request.path}: see /v1/docs."}, status=404)


def json_server_error(request):
    return JsonResponse(
        {"error": "server_error", "detail": "The server failed on this request; it has been logged."}, status=500
    )
