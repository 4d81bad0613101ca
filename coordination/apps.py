import os

from django.apps import AppConfig


class CoordinationConfig(AppConfig):
    name = "coordination"
    verbose_name = "Coordination"

    def ready(self) -> None:
        from am_project import telemetry

        # Every process that loads Django (web servers, Celery, commands) traces when OTEL_* asks for it.
        telemetry.configure(os.environ)
