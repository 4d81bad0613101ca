"""Operations endpoints outside the versioned API."""

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from coordination.health import database_health, redis_health


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """200 when PostgreSQL and Redis answer (with their versions), else 503 naming what is down."""
    database = database_health()
    redis = redis_health()
    body = {"database": database, "redis": redis}
    down = [name for name, part in (("PostgreSQL", database), ("Redis", redis)) if not part["ok"]]
    if not down:
        return JsonResponse({"status": "ok", **body})
    detail = " and ".join(down) + (" is" if len(down) == 1 else " are") + " unreachable; check that the server runs and DATABASE_URL / REDIS_URL point at it."
    return JsonResponse({"error": "unavailable", "detail": detail, "down": down, **body}, status=503)
