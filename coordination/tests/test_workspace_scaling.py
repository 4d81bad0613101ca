"""The workspace's reads cost the same with 10 files as with 5,000 files and 50,000 versions."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from coordination.models import Project
from coordination.services import agent_registry, projects

pytestmark = pytest.mark.django_db

# Test data made in bulk (50,000 writes through the API would take minutes): `files` paths, each changed
# `versions_per_file` times (versions 1..n, the file's k-th change at version (k-1)*files + i), every
# content one shared blob. One statement per execute: parameters are bound by the server.
_FILL_SQL = """
INSERT INTO coordination_blob (sha256, size, data, storage_name, created_at)
VALUES (%(sha)s, 5, 'hello'::bytea, '', now()) ON CONFLICT DO NOTHING;
INSERT INTO coordination_fileversion (project_id, path, version, blob_id, sha256, size, deleted, changed_at)
SELECT %(project)s, 'src/f' || i || '.py', (k - 1) * %(files)s + i, %(sha)s, %(sha)s, 5, false, now()
FROM generate_series(1, %(files)s) AS i, generate_series(1, %(per_file)s) AS k;
INSERT INTO coordination_workspacefile (project_id, path, current_id, version, sha256, size, deleted)
SELECT DISTINCT ON (v.path) v.project_id, v.path, v.id, v.version, v.sha256, v.size, v.deleted
FROM coordination_fileversion v WHERE v.project_id = %(project)s ORDER BY v.path, v.version DESC;
UPDATE coordination_project SET workspace_version = %(files)s::bigint * %(per_file)s WHERE id = %(project)s;
ANALYZE coordination_fileversion; ANALYZE coordination_workspacefile;
"""
SHA = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def _project(name: str, files: int, per_file: int) -> Project:
    project = projects.project_create(name=name)
    with connection.cursor() as cursor:
        for statement in filter(str.strip, _FILL_SQL.split(";")):
            params = {"project": project.id, "files": files, "per_file": per_file, "sha": SHA}
            cursor.execute(statement, {key: value for key, value in params.items() if f"%({key})s" in statement})
    return project


def _queries(client: APIClient, url: str) -> tuple[int, list[str]]:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
        if hasattr(response, "streaming_content"):
            b"".join(response.streaming_content)
    assert response.status_code == 200, (url, response.content[:300])
    # Finding the token's agent (on the first request only: then it is cached) and recording that the agent was
    # seen (at most every few seconds) are not part of the read.
    sql = [q["sql"] for q in captured.captured_queries
           if not q["sql"].startswith('UPDATE "coordination_agent"') and "a.token_hash =" not in q["sql"]]
    return len(sql), sql


class WorkspaceScalingTests:
    def test_tree_file_and_history_cost_the_same_number_of_queries_at_10_and_5000_files(self):
        small = _project("small", 10, 2)
        large = _project("large", 5000, 10)
        assert large.file_versions.count() == 50_000
        _, token = agent_registry.agent_create(name="reader", roles=["developer"])
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
        for url in ("/v1/projects/{p}/files", "/v1/projects/{p}/files?version=7",
                    "/v1/projects/{p}/files?prefix=src/f1", "/v1/projects/{p}/files/src/f3.py",
                    "/v1/projects/{p}/files/src/f3.py?version=5", "/v1/projects/{p}/files/src/f3.py/history"):
            n_small, _ = _queries(client, url.format(p=small.name))
            n_large, sql = _queries(client, url.format(p=large.name))
            assert n_small == n_large, (url, n_small, n_large, sql)

    def test_a_file_its_history_and_an_old_tree_are_read_through_indexes(self):
        large = _project("large", 5000, 10)
        from coordination import workspace_reads

        plans = {}
        with connection.cursor() as cursor:
            for name, sql, params in (
                ("file", workspace_reads.FILE_AT_SQL, {"path": "src/f3.py", "version": 20_000}),
                ("history", workspace_reads.HISTORY_SQL, {"path": "src/f3.py", "limit": 1000}),
                ("tree_at", workspace_reads.TREE_AT_SQL, {"prefix": "%", "version": 20_000}),
            ):
                cursor.execute("EXPLAIN " + sql, {"project": large.id, **params})
                plans[name] = "\n".join(row[0] for row in cursor.fetchall())
        # Each probes an index on (project, path, version) (the history index, or the unique constraint's)
        # instead of reading the 50,000 versions; the old tree does it once per path.
        for name, plan in plans.items():
            assert "Seq Scan on coordination_fileversion" not in plan, (name, plan)
            assert "file_history" in plan or "file_version_unique" in plan, (name, plan)
