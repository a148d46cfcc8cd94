"""`manage.py portals`: every portal and its health, for the engineer on call."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db.models import Count, Max, Q
from django.utils import timezone

from b24app.models import Portal, PortalUser, RestCall


class Command(BaseCommand):
    help = "List installed portals with their state, users and the last day's REST health."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--hours", type=int, default=24, help="REST statistics window")

    def handle(self, *args: Any, **options: Any) -> None:
        since = timezone.now() - timedelta(hours=options["hours"])
        portals = Portal.objects.annotate(
            active=Count("users", filter=Q(users__state=PortalUser.State.ACTIVE)),
            reopen=Count("users", filter=Q(users__state=PortalUser.State.NEEDS_REOPEN)),
        ).order_by("domain")
        header = (
            f"{'domain':32} {'member_id':12} {'state':16} {'users':>5} {'reopen':>6} "
            f"{'calls':>6} {'errors':>6} {'503s':>5}  last call"
        )
        self.stdout.write(header)
        self.stdout.write("-" * len(header))
        for p in portals:
            stats = RestCall.objects.filter(member_id=p.member_id, created_at__gte=since).aggregate(
                calls=Count("id"),
                errors=Count("id", filter=~Q(error="")),
                limited=Count("id", filter=Q(error="QUERY_LIMIT_EXCEEDED")),
                last=Max("created_at"),
            )
            last = stats["last"].strftime("%Y-%m-%d %H:%M:%S") if stats["last"] else "never"
            state = p.state + (" !" if p.state != Portal.State.ACTIVE else "")
            self.stdout.write(
                f"{p.domain[:32]:32} {p.member_id[:12]:12} {state:16} {p.active:>5} "
                f"{p.reopen:>6} {stats['calls']:>6} {stats['errors']:>6} {stats['limited']:>5}"
                f"  {last}"
            )
            if p.state_reason:
                self.stdout.write(f"    reason: {p.state_reason}")
        if not portals:
            self.stdout.write("(no portals installed yet)")
