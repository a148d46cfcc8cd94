"""Bitrix24's language codes (`LANG` of a frame) → the language the app speaks (b24app.langs),
and a frame opened in one: the page, the stored user, the page token and the API's words follow
it; a code without a catalog, or junk, gives a whole page in the fallback language."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.conf import global_settings
from django.test import Client
from django.utils.translation import override

from b24app import langs
from b24app.models import PortalUser
from b24app.problems import Problem, words
from tests.helpers import api, install, open_page, page_token

# Every code the Bitrix24 docs list (b24restdocs: crm/data-types.md "Language Identifiers",
# sale/status-lang, catalog price-type-lang getLanguages, landing/demos/localization.md) →
# (the Django language it names, the language the app speaks while it ships no catalog for it).
DOCUMENTED = {
    "ar": ("ar", "en"),
    "br": ("pt-br", "pt-br"),
    "by": ("be", "ru"),
    "de": ("de", "de"),
    "en": ("en", "en"),
    "fr": ("fr", "en"),
    "hi": ("hi", "en"),
    "id": ("id", "en"),
    "in": ("en", "en"),
    "it": ("it", "en"),
    "ja": ("ja", "en"),
    "kz": ("kk", "ru"),
    "la": ("es", "es"),
    "ms": ("ms", "en"),
    "pl": ("pl", "pl"),
    "ru": ("ru", "ru"),
    "sc": ("zh-hans", "en"),
    "tc": ("zh-hant", "en"),
    "th": ("th", "en"),
    "tr": ("tr", "en"),
    "ua": ("uk", "uk"),
    "uz": ("uz", "ru"),
    "vn": ("vi", "en"),
}


def test_every_documented_bitrix24_code_names_a_django_language() -> None:
    assert set(langs.BITRIX24_LANGUAGES) == set(DOCUMENTED)
    django_languages = {code for code, _name in global_settings.LANGUAGES}
    for code, (language, _spoken) in DOCUMENTED.items():
        assert langs.django_language(code) == language, code
        assert language in django_languages, language


@pytest.mark.parametrize(("code", "expected"), [(c, e[1]) for c, e in DOCUMENTED.items()])
def test_each_bitrix24_code_is_spoken_in_its_language_or_the_nearest_shipped(
    code: str, expected: str
) -> None:
    assert langs.speak(code) == expected


@pytest.mark.parametrize("code", ["UA", "Ua", " ua ", "ua\t", "LA", "Br", " PL"])
def test_case_and_spaces_do_not_matter(code: str) -> None:
    assert langs.speak(code) == DOCUMENTED[code.strip().lower()][1]


@pytest.mark.parametrize(
    "junk",
    [
        None,
        7,
        ["ua"],
        b"ua",
        "",
        " ",
        "u",
        "ukr",
        "uk",
        "es",
        "ru-RU",
        "ua\x00",
        "../ru",
        "x" * 10_000,
        "е",
        "ру",
    ],  # fmt: skip
)
def test_unknown_codes_and_junk_give_english_never_an_error(junk: Any) -> None:
    assert langs.speak(junk) == "en"
    assert langs.django_language(junk) is None


def test_shipped_languages_and_their_fallbacks(settings: Any) -> None:
    assert langs.shipped("pt-br") == langs.shipped("pt_BR") == langs.shipped(" PT-BR") == "pt-br"
    assert langs.shipped("kk") == "ru" and langs.shipped("fr") == "en"
    assert langs.shipped(None) == langs.shipped(3) == langs.shipped("") == "en"
    settings.LANGUAGES = [("en", "English"), ("de", "Deutsch")]  # Russian not shipped
    assert langs.speak("kz") == "en" and langs.speak("ru") == "en" and langs.speak("de") == "de"


def test_words_speak_every_shipped_language(settings: Any) -> None:
    english = {problem: words(problem, "en") for problem in Problem if problem}
    assert all(english.values())
    for language, _name in settings.LANGUAGES:
        if language == "en":
            continue
        said = {problem: words(problem, language) for problem in english}
        untranslated = [p for p, text in said.items() if not text or text == english[p]]
        assert untranslated == [], language
        with override(language):  # without a language: the active one
            assert words(Problem.DENIED) == said[Problem.DENIED]
    assert words(Problem.DENIED, "fr") == english[Problem.DENIED]  # no French catalog
    assert words(Problem.DENIED, "kk") == words(Problem.DENIED, "ru")  # Kazakh: as Bitrix24
    assert words(Problem.NONE, "de") == ""


def _page_messages(response: Any) -> dict[str, str]:
    found = re.search(
        r'<script id="fp-messages" type="application/json">(.*?)</script>',
        response.content.decode(),
        re.S,
    )
    assert found
    return dict(json.loads(found.group(1)))


def _html_lang(response: Any) -> str:
    found = re.search(r'<html lang="([^"]+)">', response.content.decode())
    assert found
    return found.group(1)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("code", "language", "pin", "bad_request"),
    [
        ("ua", "uk", "Закріпити", "Вкажіть, закріпити потік чи відкріпити."),
        ("br", "pt-br", "Fixar", "Informe se o fluxo deve ser fixado."),
        ("kz", "ru", "Закрепить", "Укажите, закрепить поток или открепить."),
        ("sc", "en", "Pin", "Say whether the flow should be pinned."),
    ],
)
def test_a_frame_opened_in_a_bitrix24_language_is_answered_in_it_throughout(
    sandbox: Any, code: str, language: str, pin: str, bad_request: str
) -> None:
    client = Client()
    install(client, sandbox)
    page = open_page(client, sandbox, 2, lang=code)
    assert _html_lang(page) == language  # what the page says it is written in
    assert _page_messages(page)["pin"] == pin  # the page script's texts
    assert PortalUser.objects.get(user_id=2).language == language
    # The page's own requests carry the language in its token: refusals come in it too.
    answer = api(client, page_token(page), "POST", "/flows/api/pin", {"flow_id": 1})
    assert answer.status_code == 400 and answer.json() == {"error": bad_request}
