"""Reachability of the parts AM cannot work without: PostgreSQL and Redis."""

from functools import lru_cache
from typing import Any

import redis
from django.conf import settings
from django.db import DatabaseError, connection


def database_health() -> dict[str, Any]:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_setting('server_version')")
            version = cursor.fetchone()[0]
        return {"ok": True, "version": version}
    except DatabaseError as exc:
        # Drop the broken connection so the next request starts afresh.
        connection.close_if_unusable_or_obsolete()
        return {"ok": False, "error": str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}


@lru_cache(maxsize=1)
def _redis_client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)


def redis_health() -> dict[str, Any]:
    try:
        info = _redis_client().info("server")
        return {"ok": True, "version": info.get("redis_version", "")}
    except (redis.RedisError, OSError) as exc:
        return {"ok": False, "error": str(exc) or type(exc).__name__}
