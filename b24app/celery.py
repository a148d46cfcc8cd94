"""The Celery application. Workers run `celery -A b24app worker`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "b24app.settings")

app = Celery("flowpins")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
