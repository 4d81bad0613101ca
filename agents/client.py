"""The worker API (`/v1`) over HTTP. Needs only httpx: no database, no Django settings.

Transport failures and `5xx`/`503` answers are retried with capped exponential
backoff (the server restarting, PostgreSQL down for a while); `4xx` answers are
raised at once as `ApiError` with the server's `error` code and `detail`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from agents import telemetry

logger = logging.getLogger("agents.client")

# The most steps one pull may ask for (api-v1.md: `?max=N`, 1 to 50).
MAX_BATCH = 50


class Flag(Protocol):
    """What `abort` may be: a `threading.Event`, or anything else that can say whether it is set."""

    def is_set(self) -> bool: ...


class ApiError(Exception):
    """The server refused the request (4xx): `code` is its `error`, `detail` its sentence."""

    def __init__(self, status: int, code: str, detail: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.body = body or {}


class LockConflict(ApiError):
    """`409 lock_conflict`: another holder has one of the paths; `conflicts` names who and until when."""

    @property
    def conflicts(self) -> list[dict[str, Any]]:
        return self.body.get("conflicts", [])


class Unreachable(Exception):
    """The server could not be reached (or kept failing) within the retry budget."""


class Unchanged:
    """`Client.file_bytes`'s answer when the file is still the content the caller holds."""

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = Unchanged()


@dataclass
class Pulled:
    step: dict[str, Any]
    workflow: dict[str, Any]
    lease: dict[str, Any]

    @property
    def step_id(self) -> str:
        return self.step["id"]

    @property
    def token(self) -> str:
        return self.lease["token"]


class Client:
    def __init__(self, server: str, token: str, *, timeout: float = 45.0, max_backoff: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.server = server.rstrip("/")
        self._http = httpx.Client(
            base_url=self.server,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "am-agent/1"},
            timeout=timeout, transport=transport,
        )
        self.max_backoff = max_backoff
        self.closed = threading.Event()
        # Whether the server takes `?max=N` on a pull: None until a batch pull was tried. A server from
        # before batch pulls refuses the parameter (400); the client then pulls one step at a time.
        self.batch_pulls: bool | None = None

    def close(self) -> None:
        self.closed.set()
        self._http.close()

    def request(
        self, method: str, path: str, *, json: Any = None, content: bytes | None = None, params: dict | None = None,
        headers: dict | None = None, retry_for: float = 60.0, timeout: float | None = None,
        abort: Flag | None = None,
    ) -> httpx.Response:
        """Send, retrying transport errors and 5xx for up to `retry_for` seconds (forever when None),
        or until `abort` is set."""
        delay = 0.5
        started = time.monotonic()
        headers = telemetry.inject(headers)  # the current step's trace context, when tracing
        while True:
            try:
                response = self._http.request(method, path, json=json, content=content, params=params, headers=headers,
                                              timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 500:
                    if response.status_code >= 400:
                        raise _api_error(response)
                    return response
                problem = f"{response.status_code} {_detail(response)}"
            if self.closed.is_set() or (abort is not None and abort.is_set()):
                raise Unreachable(f"{method} {path}: gave up, the worker is stopping ({problem})")
            if retry_for is not None and time.monotonic() - started > retry_for:
                raise Unreachable(f"{method} {path} kept failing for {retry_for:.0f} s: {problem}")
            logger.warning("%s %s failed (%s); retrying in %.1f s", method, path, problem, delay)
            time.sleep(delay * (0.75 + random.random() / 2))
            delay = min(delay * 2, self.max_backoff)

    # --- the worker calls ----------------------------------------------------

    def pull(self, roles: list[str], *, wait: float = 20.0, retry_for: float | None = None,
             abort: Flag | None = None) -> Pulled | None:
        """Long-poll for a step; the Idempotency-Key makes a retried pull return the same lease."""
        key = str(uuid.uuid4())
        response = self.request(
            "GET", f"/v1/tasks/{','.join(roles)}/ready", params={"wait": wait},
            headers={"Idempotency-Key": key}, retry_for=retry_for, timeout=wait + 15, abort=abort,
        )
        if response.status_code == 204:
            return None
        body = response.json()
        return Pulled(step=body["step"], workflow=body["workflow"], lease=body["lease"])

    def pull_batch(self, roles: list[str], *, max: int, wait: float = 20.0, retry_for: float | None = None,
                   abort: Flag | None = None) -> list[Pulled]:
        """Long-poll for up to `max` steps in one request (`?max=N`), best first; [] when none is ready.

        The answer's shape is told by its keys: `{"leases": [...]}` from a server that takes `max`,
        `{"step", "workflow", "lease"}` from one that answers a single step. A server that refuses
        the parameter (400 naming `max`) is asked for one step at a time from then on.
        """
        params: dict[str, Any] = {"wait": wait}
        if max > 1 and self.batch_pulls is not False:
            params["max"] = min(max, MAX_BATCH)
        try:
            response = self.request("GET", f"/v1/tasks/{','.join(roles)}/ready", params=params,
                                    headers={"Idempotency-Key": str(uuid.uuid4())}, retry_for=retry_for,
                                    timeout=wait + 15, abort=abort)
        except ApiError as exc:
            if "max" not in params or exc.status != 400 or "max" not in exc.detail:
                raise
            logger.info("The server does not take ?max= on a pull (%s); pulling one step at a time.", exc.detail)
            self.batch_pulls = False
            return self.pull_batch(roles, max=1, wait=wait, retry_for=retry_for, abort=abort)
        if response.status_code == 204:
            return []
        body = response.json()
        if "leases" in body:
            self.batch_pulls = True
            return [Pulled(step=item["step"], workflow=item["workflow"], lease=item["lease"])
                    for item in body["leases"]]
        return [Pulled(step=body["step"], workflow=body["workflow"], lease=body["lease"])]

    def heartbeat(self, step_id: str, token: str, iterations: list[dict] | None = None) -> dict[str, Any]:
        return self.request("POST", f"/v1/steps/{step_id}/heartbeat",
                            json={"lease_token": token, "iterations": iterations or []}, retry_for=20).json()

    def report(self, payload: dict[str, Any], *, retry_for: float | None = None,
               abort: Flag | None = None) -> dict[str, Any]:
        return self.request("POST", "/v1/report_result", json=payload, retry_for=retry_for, abort=abort).json()

    def release(self, step_id: str, token: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/steps/{step_id}/release", json={"lease_token": token}, retry_for=15).json()

    def lock(self, paths: list[str], mode: str, *, step_id: str, token: str, wait_s: float = 10) -> list[dict]:
        body = {"paths": paths, "mode": mode, "step_id": step_id, "lease_token": token, "wait_s": wait_s}
        return self.request("POST", "/v1/locks", json=body, retry_for=20, timeout=wait_s + 15).json()["locks"]

    def unlock(self, lock_id: str) -> None:
        """Release a lock before its step ends; one already gone (released with its lease) is no error."""
        try:
            self.request("DELETE", f"/v1/locks/{lock_id}", retry_for=15)
        except ApiError as exc:
            if exc.status not in (404, 409):
                raise

    def me(self) -> dict[str, Any]:
        return self.request("GET", "/v1/agents/me", retry_for=30).json()

    # --- the project's workspace ------------------------------------------------

    def files(self, project: str) -> dict[str, Any]:
        """The workspace's tree now: `{"version": N, "files": [{"path", "sha256", "size", ...}]}`."""
        return self.request("GET", f"/v1/projects/{project}/files", retry_for=30).json()

    def file_bytes(self, project: str, path: str, *, unless_sha256: str | None = None) -> bytes | None | Unchanged:
        """A file's bytes now, or None when there is no such file (any more). With `unless_sha256`, the
        content the caller holds: `UNCHANGED` when the file is still that (the server answers 304, no body)."""
        headers = {"If-None-Match": f'"{unless_sha256}"'} if unless_sha256 else None
        try:
            response = self.request("GET", f"/v1/projects/{project}/files/{quote(path)}", headers=headers,
                                    retry_for=30)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return UNCHANGED if response.status_code == 304 else response.content

    def put_file(self, project: str, path: str, content: bytes, *, fencing: int) -> dict[str, Any]:
        return self.request("PUT", f"/v1/projects/{project}/files/{quote(path)}", content=content,
                            headers={"X-AM-Fencing": str(fencing), "Content-Type": "application/octet-stream"},
                            retry_for=30).json()

    def delete_file(self, project: str, path: str, *, fencing: int) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/projects/{project}/files/{quote(path)}",
                            headers={"X-AM-Fencing": str(fencing)}, retry_for=30).json()

    def write_changes(self, project: str, changes: list[dict[str, Any]]) -> dict[str, Any]:
        """Several changes as one workspace version, all or none."""
        return self.request("POST", f"/v1/projects/{project}/changes", json={"changes": changes},
                            retry_for=30).json()


def _detail(response: httpx.Response) -> str:
    try:
        return response.json().get("detail", response.text[:200])
    except ValueError:
        return response.text[:200]


def _api_error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    code = body.get("error", "error")
    kind = LockConflict if code == "lock_conflict" else ApiError
    return kind(response.status_code, code, body.get("detail", response.text[:200]), body)
