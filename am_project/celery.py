"""The Celery app and the beat schedule.

Tasks are thin: they take ids and call a service in `coordination/services.py`.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "am_project.settings")

app = Celery("am_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
