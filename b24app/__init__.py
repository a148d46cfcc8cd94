"""Flow Pins: the Django project and the Bitrix24 portal app."""

from b24app.celery import app as celery_app

__all__ = ["celery_app"]
