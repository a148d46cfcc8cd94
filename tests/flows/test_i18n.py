"""Every string the code and templates mark for translation is in each shipped catalog,
translated and not fuzzy, and the compiled .mo the app loads matches the .po."""

from __future__ import annotations

import ast
import gettext
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
CATALOGS = sorted((ROOT / "locale").glob("*/LC_MESSAGES/django.po"))
LOCALE = ROOT / "locale" / "ru" / "LC_MESSAGES"
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


def test_there_is_a_catalog_to_check() -> None:
    assert [c.relative_to(ROOT).as_posix() for c in CATALOGS] == ["locale/ru/LC_MESSAGES/django.po"]


@pytest.mark.parametrize("catalog", CATALOGS, ids=lambda c: c.parts[-3])
def test_every_extracted_message_is_in_the_catalog_translated(
    catalog: Path, extracted: dict[tuple[str, str], Entry]
) -> None:
    shipped = parse_po(catalog.read_text(encoding="utf-8"))
    missing = sorted(key for key in extracted if key not in shipped)
    assert missing == [], f"not in {catalog.parts[-3]}: run makemessages and translate"
    mine = [shipped[key] for key in sorted(extracted)]
    assert [e.msgid for e in mine if e.fuzzy] == []
    assert [e.msgid for e in mine if not all(e.msgstrs)] == []
    wrong_plural = [e.msgid for e in mine if e.plural != extracted[(e.context, e.msgid)].plural]
    assert wrong_plural == []


def test_the_compiled_catalog_matches_the_po() -> None:
    shipped = parse_po((LOCALE / "django.po").read_text(encoding="utf-8"))
    with (LOCALE / "django.mo").open("rb") as mo:
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
        and [compiled.ngettext(e.msgid, e.plural, n) for n in (1, 2, 5, 21)]
        != [e.msgstrs[i] for i in (0, 1, 2, 0)]
    ]
    assert stale == [], "run msgfmt: the .mo does not match the .po"


def test_every_plural_message_has_all_its_russian_forms() -> None:
    shipped = parse_po((LOCALE / "django.po").read_text(encoding="utf-8"))
    plurals = [e for e in shipped.values() if e.plural]
    assert plurals
    for entry in plurals:
        assert len(entry.msgstrs) == 4 and all(entry.msgstrs), entry.msgid  # nplurals=4
