from django.apps import AppConfig
from django.core import checks


class B24AppConfig(AppConfig):
    name = "b24app"
    verbose_name = "Bitrix24 portals"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from b24app.checks import check_metrics_directory, check_token_key

        # Tagged `database`: it reads stored rows, so it runs with `check --database default` and
        # `migrate`, not with every management command (gunicorn and the worker call it directly).
        checks.register(check_token_key, checks.Tags.database)
        checks.register(check_metrics_directory)
