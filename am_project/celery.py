"""The Celery app and the beat schedule.

Tasks are thin: they take ids and call a service in `coordination/services/`.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "am_project.settings")

app = Celery("am_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.on_after_finalize.connect
def _beat_schedule(sender: Celery, **kwargs) -> None:
    from django.conf import settings

    sender.conf.beat_schedule = {
        "sweep-expired": {
            "task": "coordination.tasks.sweep_expired",
            "schedule": settings.AM_SWEEP_INTERVAL_S,
            # A sweep not started within one interval is superseded by the next one.
            "options": {"expires": settings.AM_SWEEP_INTERVAL_S},
        },
        "resend-stalled": {"task": "coordination.tasks.resend_stalled", "schedule": 60.0, "options": {"expires": 60}},
        "workspace-collect": {"task": "coordination.tasks.collect_unused_contents", "schedule": 3600.0,
                              "options": {"expires": 3600}},
    }
