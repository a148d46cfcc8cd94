from django.apps import AppConfig


class FlowsConfig(AppConfig):
    name = "flows"
    verbose_name = "Flows and pins"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from flows import signals  # noqa: F401  (connects the uninstall receiver)
