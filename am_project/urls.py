from django.contrib import admin
from django.urls import include, path

from coordination.views import healthz

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("v1/", include("coordination.api.urls")),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("dashboard.urls")),
]
