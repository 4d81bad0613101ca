"""The embedded PostgreSQL and Redis: started once, shared by every process."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from am_project import embedded

BASE_DIR = Path(__file__).resolve().parent.parent.parent

# Each process attaches (or starts, whichever comes first) and leaves a mark the other must see.
_SCRIPT = textwrap.dedent(
    """
    import sys, psycopg, redis
    from am_project import embedded
    name = sys.argv[1]
    params = embedded.ensure_postgres()
    url = embedded.ensure_redis()
    with psycopg.connect(host=params.host, port=params.port, user=params.user, dbname=params.name, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(42)")  # concurrent CREATE TABLE IF NOT EXISTS can collide
        conn.execute("CREATE TABLE IF NOT EXISTS marks (name text PRIMARY KEY)")
        conn.execute("INSERT INTO marks VALUES (%s) ON CONFLICT DO NOTHING", [name])
    redis.Redis.from_url(url).sadd("marks", name)
    print(params.host, url)
    """
)


@pytest.mark.slow
class EmbeddedServicesTests:
    def test_two_processes_start_once_and_share_the_same_servers(self, tmp_path):
        base = tmp_path / "var"
        env = {**os.environ, "AM_VAR_DIR": str(base)}
        env.pop("DATABASE_URL", None)
        env.pop("REDIS_URL", None)
        try:
            # Two processes race to start the services.
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", _SCRIPT, name], cwd=BASE_DIR, env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                )
                for name in ("first", "second")
            ]
            outputs = [p.communicate(timeout=180) for p in procs]
            for proc, (out, err) in zip(procs, outputs):
                assert proc.returncode == 0, err
            assert outputs[0][0] == outputs[1][0], "both processes must reach the same servers"
            assert embedded.postgres_running(base)

            import psycopg
            import redis

            params = embedded.ensure_postgres(base)
            with psycopg.connect(host=params.host, port=params.port, user=params.user, dbname=params.name) as conn:
                marks = {row[0] for row in conn.execute("SELECT name FROM marks")}
            assert marks == {"first", "second"}
            client = redis.Redis.from_url(embedded.redis_url(base))
            assert client.smembers("marks") == {b"first", b"second"}
            client.close()
        finally:
            embedded.stop_redis(base)
            embedded.stop_postgres(base)
        assert not embedded.postgres_running(base)

    def test_data_survives_a_restart(self, tmp_path):
        import psycopg

        base = tmp_path / "var"
        try:
            params = embedded.ensure_postgres(base)
            with psycopg.connect(host=params.host, port=params.port, user=params.user, dbname=params.name, autocommit=True) as conn:
                conn.execute("CREATE TABLE kept (x int)")
                conn.execute("INSERT INTO kept VALUES (42)")
            embedded.stop_postgres(base)
            params = embedded.ensure_postgres(base)
            with psycopg.connect(host=params.host, port=params.port, user=params.user, dbname=params.name) as conn:
                assert conn.execute("SELECT x FROM kept").fetchone() == (42,)
        finally:
            embedded.stop_postgres(base)
