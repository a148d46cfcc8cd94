"""Django admin for portals and their users. Token values are never shown or editable."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest

from b24app.models import Portal, PortalUser, RestCall


class PortalUserInline(admin.TabularInline):  # type: ignore[type-arg]
    model = PortalUser
    fields = (
        "user_id",
        "state",
        "state_reason",
        "is_admin",
        "language",
        "expires_at",
        "last_seen_at",
        "refreshed_at",
    )
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


@admin.register(Portal)
class PortalAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "domain",
        "member_id",
        "state",
        "status",
        "user_count",
        "installed_at",
        "updated_at",
    )
    list_filter = ("state", "status")
    search_fields = ("domain", "member_id")
    exclude = ("application_token",)
    readonly_fields = (
        "member_id",
        "domain",
        "client_endpoint",
        "server_endpoint",
        "scope",
        "status",
        "installer_user_id",
        "installed_at",
        "updated_at",
    )
    inlines = [PortalUserInline]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Portal]:
        queryset: QuerySet[Portal] = super().get_queryset(request)
        return queryset.annotate(
            _users=Count("users", filter=Q(users__state=PortalUser.State.ACTIVE))
        )

    @admin.display(description="active users", ordering="_users")
    def user_count(self, obj: Portal) -> int:
        return int(getattr(obj, "_users", 0))


@admin.register(PortalUser)
class PortalUserAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("user_id", "portal", "state", "is_admin", "expires_at", "last_seen_at")
    list_filter = ("state", "is_admin")
    search_fields = ("portal__domain", "portal__member_id", "user_id")
    exclude = ("access_token", "refresh_token")
    readonly_fields = (
        "portal",
        "user_id",
        "expires_at",
        "token_version",
        "last_seen_at",
        "refreshed_at",
        "language",
        "state_reason",
    )


@admin.register(RestCall)
class RestCallAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "created_at",
        "member_id",
        "method",
        "http_status",
        "error",
        "duration_ms",
        "commands",
    )
    list_filter = ("method", "error")
    search_fields = ("member_id", "method")
    readonly_fields = list_display

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
