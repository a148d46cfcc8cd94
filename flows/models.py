"""Flows learnt per portal, and each user's pin intent with what the portal last answered."""

from __future__ import annotations

from django.db import models
from django.utils import timezone

from b24app.models import Portal
from b24app.problems import Problem


class Flow(models.Model):
    """A flow the app has learnt about on a portal (from Flow.list, a task, or a user)."""

    class Source(models.TextChoices):
        LIST = "list", "tasks.flow.Flow.list"
        TASK = "task", "a visible task"
        USER = "user", "added by a user"

    portal = models.ForeignKey(Portal, on_delete=models.CASCADE, related_name="flows")
    flow_id = models.PositiveIntegerField()
    name = models.CharField(max_length=500, blank=True, default="")
    active = models.BooleanField(default=True)
    efficiency = models.IntegerField(null=True, blank=True)
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.LIST)
    learned_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["portal", "flow_id"], name="flow_unique_per_portal"),
        ]

    def __str__(self) -> str:
        return f"flow {self.flow_id} {self.name!r}"


class PinIntent(models.Model):
    """What one user wants for one flow, and what Bitrix24 last said about it.

    `tasks.flow.Flow.pin` is a toggle whose boolean answer is the only way to read the state, so
    a click writes `desired`; workers call pin while `observed` differs from
    `desired`, recording every answer. `observed` is None when unknown (never asked, or an answer
    was lost after the toggle may have been applied).
    """

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        DONE = "done", "done"
        FAILED = "failed", "failed"

    portal = models.ForeignKey(Portal, on_delete=models.CASCADE, related_name="pin_intents")
    user_id = models.PositiveIntegerField()
    flow_id = models.PositiveIntegerField()
    desired = models.BooleanField()
    observed = models.BooleanField(null=True)
    observed_at = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    problem = models.CharField(max_length=16, choices=Problem.choices, blank=True, default="")
    # Answered pin calls since the last click (or since a lost answer made the state unknown).
    toggles = models.PositiveIntegerField(default=0)
    # After a toggle whose answer was lost, the flow is left alone until then (the portal may
    # still be applying it); other flows of the user go on meanwhile.
    not_before = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["portal", "user_id", "flow_id"], name="one_intent_per_user_flow"
            ),
        ]
        indexes = [
            models.Index(fields=["status", "updated_at"]),
            models.Index(fields=["portal", "user_id", "status", "updated_at"]),
        ]

    def __str__(self) -> str:
        return f"user {self.user_id} flow {self.flow_id}: want {self.desired}, saw {self.observed}"

    @property
    def converged(self) -> bool:
        return self.observed is not None and self.observed == self.desired


class PinRead(models.Model):
    """Whether a user's real pin states were read from Bitrix24, and whether a read is wanted.

    A read (toggle pairs, `flows.pinread`) covers every flow of the user's list whose state was
    last observed before `requested_at`; it runs inside the user's convergence run.
    """

    portal = models.ForeignKey(Portal, on_delete=models.CASCADE, related_name="pin_reads")
    user_id = models.PositiveIntegerField()
    requested_at = models.DateTimeField(null=True, blank=True)  # None: no read wanted
    read_at = models.DateTimeField(null=True, blank=True)  # the last read that finished

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["portal", "user_id"], name="one_pin_read_per_user"),
        ]

    def __str__(self) -> str:
        return f"user {self.user_id}: read {self.read_at}, wanted since {self.requested_at}"
