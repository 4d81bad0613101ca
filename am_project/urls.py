from django.contrib import admin
from django.urls import include, path

from coordination.metrics import metrics
from coordination.views import healthz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
    path("v1/", include("coordination.api.urls")),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("dashboard.urls")),
]


def handler404(request, exception=None):
    """JSON under /v1 (the API's error shape), Django's page elsewhere."""
    from django.views.defaults import page_not_found

    from coordination.api.errors import json_not_found

    if request.path.startswith("/v1/"):
        return json_not_found(request, exception)
    return page_not_found(request, exception)


def handler500(request):
    from django.views.defaults import server_error

    from coordination.api.errors import json_server_error

    if request.path.startswith("/v1/"):
        return json_server_error(request)
    return server_error(request)
