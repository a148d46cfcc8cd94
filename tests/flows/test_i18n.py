"""Every string the code and templates mark for translation is in each shipped catalog (one per
language of settings.LANGUAGES but English), translated, not fuzzy, with the same placeholders
and every plural form of the language (Django's own rule); the compiled .mo the app loads
matches the .po; and `make messages` refreshes every one of them."""

from __future__ import annotations

import ast
import gettext
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import django
import pytest
from django.conf import settings
from django.utils.translation import to_locale

ROOT = Path(__file__).resolve().parents[2]
CATALOGS = sorted((ROOT / "locale").glob("*/LC_MESSAGES/django.po"))
DJANGO_LOCALE = Path(django.__file__).resolve().parent / "conf" / "locale"
PLACEHOLDER = re.compile(r"%\((\w+)\)[sd]")
# What the project's extraction leaves out (README: `makemessages ... --ignore=...`).
NOT_EXTRACTED = {"sandbox", "tests", "bench", "devtools"}


class Entry(NamedTuple):
    context: str
    msgid: str
    plural: str
    msgstrs: list[str]  # one per plural form, or the one msgstr
    fuzzy: bool


def _po_string(text: str) -> str:
    return str(ast.literal_eval(text)) if text else ""  # a C-style quoted string


def parse_po(text: str) -> dict[tuple[str, str], Entry]:
    """The live entries of a .po/.pot file by (msgctxt, msgid); the header and obsolete (#~)
    entries are left out."""
    entries: dict[tuple[str, str], Entry] = {}
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        fuzzy, last = False, ""
        for line in block.splitlines():
            if line.startswith("#,"):
                fuzzy = fuzzy or "fuzzy" in {flag.strip() for flag in line[2:].split(",")}
            elif line.startswith("#"):
                continue
            elif line.startswith('"'):
                fields[last] += _po_string(line)
            elif line.strip():
                last, _, value = line.partition(" ")
                fields[last] = _po_string(value.strip())
        if not fields.get("msgid"):
            continue
        if "msgid_plural" in fields:
            msgstrs = [v for k, v in sorted(fields.items()) if k.startswith("msgstr[")]
        else:
            msgstrs = [fields.get("msgstr", "")]
        key = (fields.get("msgctxt", ""), fields["msgid"])
        entries[key] = Entry(*key, fields.get("msgid_plural", ""), msgstrs, fuzzy)
    return entries


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Entry]:
    """What `makemessages` finds in the code and templates today, run on a copy of the sources
    (the copy's settings point LOCALE_PATHS into the copy): the real locale/ is never touched."""
    copy = tmp_path_factory.mktemp("extract")
    sources = [
        d
        for d in ROOT.iterdir()
        if d.is_dir()
        and d.name not in NOT_EXTRACTED
        and ((d / "__init__.py").exists() or d.name == "templates")
    ]
    assert {"b24app", "flows", "templates"} <= {d.name for d in sources}
    for source in sources:
        shutil.copytree(source, copy / source.name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "manage.py", copy / "manage.py")
    env = {
        **os.environ,
        "DEBUG": "1",
        "DJANGO_SETTINGS_MODULE": "b24app.settings",
        "FLOWPINS_ENV_FILE": str(copy / "no.env"),
        "FLOWPINS_VAR_DIR": str(copy / "var"),
        "PYTHONPATH": str(copy),
    }
    run = subprocess.run(
        [sys.executable, "manage.py", "makemessages", "-l", "ru", "--keep-pot"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    entries = parse_po((copy / "locale" / "django.pot").read_text(encoding="utf-8"))
    assert len(entries) > 40  # the extraction found the app's strings, not nothing
    return entries


def _header(po: str) -> dict[str, str]:
    """The .po header's fields (the msgstr of the empty msgid)."""
    block = re.split(r"\n\s*\n", po)[0]
    text = "".join(_po_string(line) for line in block.splitlines() if line.startswith('"'))
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line)


def _plural_rule(header: dict[str, str]) -> tuple[int, Callable[[int], int]]:
    """nplurals and the plural expression of a Plural-Forms header, as gettext reads them."""
    found = re.fullmatch(
        r"\s*nplurals\s*=\s*(\d+);\s*plural\s*=\s*(.+?);?\s*", header["Plural-Forms"]
    )
    assert found, header["Plural-Forms"]
    return int(found.group(1)), gettext.c2py(found.group(2))


def _language_of(catalog: Path) -> str:
    return catalog.parts[-3]


def test_every_language_but_english_ships_a_catalog_and_make_messages_refreshes_it() -> None:
    wanted = {to_locale(code) for code, _name in settings.LANGUAGES if code != "en"}
    assert wanted >= {"ru", "uk", "de", "es", "pt_BR", "pl"}
    assert {_language_of(c) for c in CATALOGS} == wanted
    for catalog in CATALOGS:
        assert _header(catalog.read_text(encoding="utf-8"))["Language"] == _language_of(catalog)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    refreshed = re.search(r"^LOCALES\s*:=\s*(.*)$", makefile, re.M)
    assert refreshed and set(refreshed.group(1).split()) == wanted


@pytest.mark.parametrize("catalog", CATALOGS, ids=_language_of)
def test_every_extracted_message_is_in_the_catalog_translated(
    catalog: Path, extracted: dict[tuple[str, str], Entry]
) -> None:
    shipped = parse_po(catalog.read_text(encoding="utf-8"))
    missing = sorted(key for key in extracted if key not in shipped)
    assert missing == [], f"not in {_language_of(catalog)}: run make messages and translate"
    mine = [shipped[key] for key in sorted(extracted)]
    assert [e.msgid for e in mine if e.fuzzy] == []
    assert [e.msgid for e in mine if not all(e.msgstrs)] == []
    wrong_plural = [e.msgid for e in mine if e.plural != extracted[(e.context, e.msgid)].plural]
    assert wrong_plural == []


@pytest.mark.parametrize("catalog", CATALOGS, ids=_language_of)
def test_every_translation_keeps_the_placeholders_of_its_message(catalog: Path) -> None:
    """A lost or misspelled %(name)s would raise (or show a raw %) when the page fills it in."""
    wrong = [
        (e.msgid, text)
        for e in parse_po(catalog.read_text(encoding="utf-8")).values()
        for text in e.msgstrs
        if set(PLACEHOLDER.findall(text)) != set(PLACEHOLDER.findall(e.msgid))
    ]
    assert wrong == []


@pytest.mark.parametrize("catalog", CATALOGS, ids=_language_of)
def test_plural_messages_have_every_form_of_djangos_own_rule(catalog: Path) -> None:
    """The page's plural table (flows.page.plurals_js) indexes forms by the plural rule of
    Django's own catalog for the language: ours must be the same rule, with every form."""
    po = catalog.read_text(encoding="utf-8")
    nplurals, rule = _plural_rule(_header(po))
    django_po = DJANGO_LOCALE / _language_of(catalog) / "LC_MESSAGES" / "django.po"
    django_nplurals, django_rule = _plural_rule(_header(django_po.read_text(encoding="utf-8")))
    numbers = [*range(1001), 1_000_000, 2_000_000]
    assert nplurals == django_nplurals
    assert [rule(n) for n in numbers] == [django_rule(n) for n in numbers]
    plurals = [e for e in parse_po(po).values() if e.plural]
    assert plurals
    assert [e.msgid for e in plurals if len(e.msgstrs) != nplurals or not all(e.msgstrs)] == []


@pytest.mark.parametrize("catalog", CATALOGS, ids=_language_of)
def test_the_compiled_catalog_matches_the_po(catalog: Path) -> None:
    po = catalog.read_text(encoding="utf-8")
    shipped = parse_po(po)
    _nplurals, rule = _plural_rule(_header(po))
    with catalog.with_suffix(".mo").open("rb") as mo:
        compiled = gettext.GNUTranslations(mo)
    stale = [
        e.msgid
        for e in shipped.values()
        if not e.plural and not e.context and compiled.gettext(e.msgid) != e.msgstrs[0]
    ]
    stale += [
        e.msgid
        for e in shipped.values()
        if e.plural
        and [compiled.ngettext(e.msgid, e.plural, n) for n in range(200)]
        != [e.msgstrs[rule(n)] for n in range(200)]
    ]
    assert stale == [], "run make messages: the .mo does not match the .po"
