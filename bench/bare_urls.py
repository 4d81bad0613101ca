"""The ceiling of the web stack: a claim view and a completion view, one SQL statement each, no auth.

Served by the same server, settings and middleware as AgentManager (see
bare_settings.py), they measure what Django, DRF and the server cost before
any of AgentManager's own work.
"""

from django.db import connection
from django.urls import path
from rest_framework.response import Response
from rest_framework.views import APIView

from coordination.views import healthz

TABLE = "bench_bare_step"


class BareClaim(APIView):
    authentication_classes: list = []
    permission_classes: list = []

    def get(self, request):
        with connection.cursor() as cursor:
            cursor.execute(
                f"""UPDATE {TABLE} SET status = 'in_progress', attempt = attempt + 1
                    WHERE id = (SELECT id FROM {TABLE} WHERE status = 'ready' ORDER BY id LIMIT 1
                                FOR UPDATE SKIP LOCKED)
                    RETURNING id""")
            row = cursor.fetchone()
        return Response({"id": row[0]} if row else {}, status=200 if row else 204)


class BareComplete(APIView):
    authentication_classes: list = []
    permission_classes: list = []

    def post(self, request):
        with connection.cursor() as cursor:
            cursor.execute(f"UPDATE {TABLE} SET status = 'completed' WHERE id = %s", [request.data["id"]])
        return Response({"status": "completed"})


urlpatterns = [path("bare/claim", BareClaim.as_view()), path("bare/complete", BareComplete.as_view()),
               path("healthz", healthz)]
