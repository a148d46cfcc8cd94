from django.apps import AppConfig


class FlowsConfig(AppConfig):
    name = "flows"
    verbose_name = "Flows and pins"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from b24app.placements import DEFAULT, Placement, register
        from flows import signals  # noqa: F401  (connects the uninstall receiver)
        from flows.intents import PAGE_INTENTS
        from flows.page import app_view

        # The flows page is the app's own page and its left-menu item; a reopen reads the
        # user's intents with the portal and the user (one query).
        register(Placement(DEFAULT, app_view, also=PAGE_INTENTS))
        title = {"en": "Flow Pins", "ru": "Закрепление потоков"}
        register(Placement("LEFT_MENU", app_view, title=title, also=PAGE_INTENTS))
