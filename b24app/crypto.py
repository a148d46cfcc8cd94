"""Tokens are encrypted at rest (Fernet: AES-128-CBC + HMAC-SHA256).

`B24_TOKEN_KEY` may hold several comma-separated keys: the first encrypts, all decrypt, so a key
can be rotated without losing stored tokens. Any string works as a key: it is stretched with
SHA-256 into a Fernet key, so an operator can paste a passphrase or a generated key alike.
"""

from __future__ import annotations

import base64
import hashlib
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


def _fernet_for(secret: str) -> Fernet:
    digest = hashlib.sha256(secret.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


@lru_cache(maxsize=4)
def _cipher(keys: str) -> MultiFernet:
    return MultiFernet(_fernets(keys))


@lru_cache(maxsize=4)
def _fernets(keys: str) -> list[Fernet]:
    parts = [k.strip() for k in keys.split(",") if k.strip()]
    if not parts:
        raise ValueError("B24_TOKEN_KEY is empty")
    return [_fernet_for(p) for p in parts]


def encrypt(plaintext: str) -> str:
    if plaintext == "":
        return ""
    return _cipher(settings.B24_TOKEN_KEY).encrypt(plaintext.encode()).decode()


class UndecryptableToken(Exception):
    """The stored value was encrypted with a key we no longer have."""


def decrypt(ciphertext: str) -> str:
    if ciphertext == "":
        return ""
    try:
        return _cipher(settings.B24_TOKEN_KEY).decrypt(ciphertext.encode()).decode()
    except InvalidToken as exc:
        raise UndecryptableToken("a stored token cannot be decrypted with B24_TOKEN_KEY") from exc


def readable(ciphertext: str) -> bool:
    """Whether some key of B24_TOKEN_KEY opens this stored value."""
    try:
        decrypt(ciphertext)
    except UndecryptableToken:
        return False
    return True


def sealed_with_newest_key(ciphertext: str) -> bool:
    """Whether the first (encrypting) key alone opens this stored value: once every value is,
    the other keys can be dropped."""
    if ciphertext == "":
        return True
    try:
        _fernets(settings.B24_TOKEN_KEY)[0].decrypt(ciphertext.encode())
    except InvalidToken:
        return False
    return True
