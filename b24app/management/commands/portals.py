"""`manage.py portals`: every portal and its health, for the engineer on call."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from b24app.models import Portal
from b24app.status import ACTIVE_USERS, REOPEN_USERS, rest_usage


class Command(BaseCommand):
    help = "List installed portals with their state, users and the last day's REST health."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--hours", type=int, default=24, help="REST statistics window")

    def handle(self, *args: Any, **options: Any) -> None:
        since = timezone.now() - timedelta(hours=options["hours"])
        portals = Portal.objects.annotate(active=ACTIVE_USERS, reopen=REOPEN_USERS).order_by(
            "domain"
        )
        header = (
            f"{'domain':32} {'member_id':12} {'state':16} {'users':>5} {'reopen':>6} "
            f"{'calls':>6} {'errors':>6} {'503s':>5}  last call"
        )
        self.stdout.write(header)
        self.stdout.write("-" * len(header))
        for p in portals:
            used = rest_usage(p.member_id, since)
            last = used.last.strftime("%Y-%m-%d %H:%M:%S") if used.last else "never"
            state = p.state + (" !" if p.state != Portal.State.ACTIVE else "")
            self.stdout.write(
                f"{p.domain[:32]:32} {p.member_id[:12]:12} {state:16} {p.active:>5} "
                f"{p.reopen:>6} {used.calls:>6} {used.errors:>6} {used.limited:>5}"
                f"  {last}"
            )
            if p.state_reason:
                self.stdout.write(f"    reason: {p.state_reason}")
        if not portals:
            self.stdout.write("(no portals installed yet)")
