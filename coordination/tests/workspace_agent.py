"""An agent working a workspace over the REST API, for the workspace tests: lock, write, delete, batch."""

from rest_framework.test import APIClient

from coordination.services import agent_registry


class Worker:
    def __init__(self, name: str, can_submit: bool = False) -> None:
        self.agent, token = agent_registry.agent_create(name=name, roles=["developer"], capacity=2,
                                                        can_submit=can_submit)
        self.client = APIClient()
        self.client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")

    def lock(self, *paths: str, mode: str = "write", project: str = "webapp", ttl_s: int = 300) -> list[dict]:
        response = self.client.post("/v1/locks", {"project": project, "paths": list(paths), "mode": mode,
                                                  "ttl_s": ttl_s}, format="json")
        assert response.status_code == 201, response.content
        return response.json()["locks"]

    def put(self, path: str, content: bytes, fencing: int | None, project: str = "webapp", **headers):
        extra = {"HTTP_X_AM_FENCING": str(fencing)} if fencing is not None else {}
        extra.update({f"HTTP_{name.upper().replace('-', '_')}": value for name, value in headers.items()})
        return self.client.generic("PUT", f"/v1/projects/{project}/files/{path}", content,
                                   content_type="application/octet-stream", **extra)

    def delete(self, path: str, fencing: int | None, project: str = "webapp"):
        extra = {"HTTP_X_AM_FENCING": str(fencing)} if fencing is not None else {}
        return self.client.delete(f"/v1/projects/{project}/files/{path}", **extra)

    def batch(self, changes: list[dict], project: str = "webapp"):
        return self.client.post(f"/v1/projects/{project}/changes", {"changes": changes}, format="json")
