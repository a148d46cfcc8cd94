"""Portals (the tenants, keyed by member_id), their users' tokens, and the REST call log."""

from __future__ import annotations

from urllib.parse import urlsplit

from django.db import models
from django.utils import timezone

from b24app.fields import EncryptedTextField


class Portal(models.Model):
    class State(models.TextChoices):
        ACTIVE = "active", "active"
        NEEDS_REINSTALL = "needs_reinstall", "needs reinstall"
        UNINSTALLED = "uninstalled", "uninstalled"

    # member_id never changes, even when the portal is renamed: it is the tenant key.
    member_id = models.CharField(max_length=64, unique=True)
    domain = models.CharField(max_length=255)
    client_endpoint = models.URLField(max_length=500)
    server_endpoint = models.URLField(max_length=500)
    scope = models.CharField(max_length=500, blank=True, default="")
    status = models.CharField(max_length=2, blank=True, default="")  # L/F/D/T/P from app.info
    application_token = EncryptedTextField(blank=True, default="")
    state = models.CharField(max_length=20, choices=State.choices, default=State.ACTIVE)
    state_reason = models.CharField(max_length=300, blank=True, default="")
    installer_user_id = models.PositiveIntegerField(null=True, blank=True)
    # Enterprise plans allow 5 requests/s with a burst of 250; NULL means the settings' default.
    rate_per_second = models.FloatField(null=True, blank=True)
    rate_burst = models.PositiveIntegerField(null=True, blank=True)
    installed_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["domain"]

    def __str__(self) -> str:
        return f"{self.domain} ({self.member_id[:8]})"

    @property
    def origin(self) -> str:
        """The portal's web origin, e.g. https://x.bitrix24.com — what may frame our pages."""
        parts = urlsplit(self.client_endpoint)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def is_active(self) -> bool:
        return self.state == self.State.ACTIVE


class PortalUser(models.Model):
    """One portal user's OAuth tokens: a pin acts for the user whose token is used."""

    class State(models.TextChoices):
        ACTIVE = "active", "active"
        NEEDS_REOPEN = "needs_reopen", "needs to reopen the app"

    portal = models.ForeignKey(Portal, on_delete=models.CASCADE, related_name="users")
    user_id = models.PositiveIntegerField()
    access_token = EncryptedTextField(blank=True, default="")
    refresh_token = EncryptedTextField(blank=True, default="")
    expires_at = models.DateTimeField(null=True, blank=True)
    # Bumped on every token save: "is this still the pair that failed?" without comparing secrets.
    token_version = models.PositiveIntegerField(default=0)
    # A keyed digest (HMAC with SECRET_KEY) of the stored pair, "" when unknown: a reopen that
    # brings the same pair writes nothing. Never a token itself, and useless without the key.
    token_digest = models.CharField(max_length=64, blank=True, default="")
    state = models.CharField(max_length=20, choices=State.choices, default=State.ACTIVE)
    state_reason = models.CharField(max_length=300, blank=True, default="")
    is_admin = models.BooleanField(default=False)
    language = models.CharField(max_length=8, blank=True, default="")
    last_seen_at = models.DateTimeField(default=timezone.now)
    refreshed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["portal", "user_id"], name="portal_user_unique"),
        ]
        ordering = ["portal", "user_id"]

    def __str__(self) -> str:
        return f"user {self.user_id} @ {self.portal.domain}"

    @property
    def has_tokens(self) -> bool:
        return bool(self.access_token and self.refresh_token)


class RestCall(models.Model):
    """Metadata of every REST call (Market rule: keep at least 3 days). Never a secret."""

    member_id = models.CharField(max_length=64, db_index=True)
    method = models.CharField(max_length=100)
    http_status = models.PositiveSmallIntegerField(null=True)
    error = models.CharField(max_length=100, blank=True, default="")
    duration_ms = models.PositiveIntegerField(default=0)
    commands = models.PositiveSmallIntegerField(default=1)  # sub-calls of a batch
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        # a portal's calls since a time: the admin's view and `manage.py portals`
        indexes = [models.Index(fields=["member_id", "created_at"], name="restcall_member_since")]

    def __str__(self) -> str:
        return f"{self.method} {self.http_status} {self.error}".strip()
