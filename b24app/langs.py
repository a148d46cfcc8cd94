"""Bitrix24's language codes, and the language the app speaks for each: the one place.

Bitrix24 names a user's language its own way (`LANG` in the frame's query; `LANGUAGE_ID` in
events): `ua` is Ukrainian, `la` Spanish, `br` Brazilian Portuguese, `sc`/`tc` Chinese, `vn`
Vietnamese. `BITRIX24_LANGUAGES` maps every code Bitrix24 documents to the Django language it
names; `speak` turns a code into a language the app ships a catalog for.

Why not activate the Django language as it is: Django activates any code it is given and
falls back to the default language's words for every string our catalogs lack, so a French
user would get an English page that says `<html lang="fr">`, Russian plural rules could meet
English words, and the page cache would grow per code. A language without a catalog is
therefore spoken as the nearest one that has one: Kazakh, Belarusian and Uzbek as Russian (what
Bitrix24 itself does for them: its own templates use the `ru` branch for `ru`, `kz`, `by` and
`uz`), everything else as English, the app's source language and Bitrix24's default.
"""

from __future__ import annotations

from django.conf import settings
from django.utils import translation

# Every language code Bitrix24 documents → the Django language it names. Sources (the
# bitrix24/b24restdocs docs): api-reference/crm/data-types.md "Language Identifiers for
# Bitrix24"; sale/status-lang/index.md (adds `in`, English for India); catalog
# price-type-lang getLanguages (adds `kz`); landing/demos/localization.md (`by`, `uz`).
BITRIX24_LANGUAGES: dict[str, str] = {
    "ar": "ar",  # Arabic
    "br": "pt-br",  # Portuguese (Brazil)
    "by": "be",  # Belarusian
    "de": "de",  # German
    "en": "en",  # English
    "fr": "fr",  # French
    "hi": "hi",  # Hindi
    "id": "id",  # Indonesian
    "in": "en",  # English for India
    "it": "it",  # Italian
    "ja": "ja",  # Japanese
    "kz": "kk",  # Kazakh
    "la": "es",  # Spanish
    "ms": "ms",  # Malay
    "pl": "pl",  # Polish
    "ru": "ru",  # Russian
    "sc": "zh-hans",  # Chinese (Simplified)
    "tc": "zh-hant",  # Chinese (Traditional)
    "th": "th",  # Thai
    "tr": "tr",  # Turkish
    "ua": "uk",  # Ukrainian
    "uz": "uz",  # Uzbek
    "vn": "vi",  # Vietnamese
}

DEFAULT = "en"
# A language we ship no catalog for → the shipped language its speakers read Bitrix24 in.
NEAREST: dict[str, str] = {"be": "ru", "kk": "ru", "uz": "ru"}


def django_language(code: object) -> str | None:
    """The Django language a Bitrix24 code names (any case, spaces around), or None for a code
    Bitrix24 does not document (or anything that is no code at all)."""
    if not isinstance(code, str):
        return None
    return BITRIX24_LANGUAGES.get(code.strip().lower())


def shipped(language: object) -> str:
    """`language` (a Django language code) when the app ships a catalog for it, else the
    nearest shipped one (NEAREST), else English. Never an error."""
    if not isinstance(language, str):
        return DEFAULT
    code = language.strip().lower().replace("_", "-")
    ours = {lang for lang, _name in settings.LANGUAGES}
    if code in ours:
        return code
    nearest = NEAREST.get(code, DEFAULT)
    return nearest if nearest in ours else DEFAULT


def speak(code: object) -> str:
    """The language the app speaks to a user whose Bitrix24 says `code` (`LANG`,
    `LANGUAGE_ID`): always one of settings.LANGUAGES; unknown codes and junk give English."""
    return shipped(django_language(code) or DEFAULT)


def in_every_language(message: str) -> dict[str, str]:
    """`message` (an English msgid) as each Bitrix24 language code's users read the app, keyed by
    that code: for texts Bitrix24 shows itself, such as a placement's title (LANG_ALL)."""
    titles = {}
    for code in BITRIX24_LANGUAGES:
        with translation.override(speak(code)):
            titles[code] = translation.gettext(message)
    return titles
