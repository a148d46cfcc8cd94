"""A text field whose value is encrypted before it reaches the database."""

from __future__ import annotations

from typing import Any

from django.db import models

from b24app import crypto


class EncryptedTextField(models.TextField):  # type: ignore[type-arg]
    description = "Text encrypted at rest with B24_TOKEN_KEY"

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> str | None:
        if value is None:
            return None
        return crypto.decrypt(value)

    def get_prep_value(self, value: Any) -> str | None:
        value = super().get_prep_value(value)
        if value is None:
            return None
        return crypto.encrypt(str(value))
