"""Uninstalling a portal cancels its pending pin work."""

from __future__ import annotations

from typing import Any

from django.dispatch import receiver

from b24app.lifecycle import portal_uninstalled
from b24app.models import Portal
from flows.intents import cancel_portal_work


@receiver(portal_uninstalled)
def on_portal_uninstalled(sender: Any, portal: Portal, clean: bool, **_: Any) -> None:
    cancel_portal_work(portal)
