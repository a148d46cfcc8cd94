from django.apps import AppConfig
from django.utils.translation import gettext_noop


class FlowsConfig(AppConfig):
    name = "flows"
    verbose_name = "Flows and pins"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from b24app import metrics
        from b24app.placements import DEFAULT, Placement, register
        from flows import signals  # noqa: F401  (connects the uninstall receiver)
        from flows.intents import PAGE_STATE, pending_facts
        from flows.page import app_view

        # The flows page is the app's own page and its left-menu item; a reopen reads the
        # user's intents (and whether their pins were read) with the portal and the user.
        register(Placement(DEFAULT, app_view, also=PAGE_STATE))
        # The menu item's title in every Bitrix24 language, from the catalogs (at bind time).
        title = gettext_noop("Flow Pins")
        register(Placement("LEFT_MENU", app_view, title=title, also=PAGE_STATE))
        metrics.register_fact(pending_facts)  # the pins waiting, read when Prometheus asks
