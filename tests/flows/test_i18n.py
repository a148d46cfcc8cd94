"""The Russian catalog is complete, and the compiled .mo the app loads matches the .po."""

from __future__ import annotations

import gettext
import re
from pathlib import Path

LOCALE = Path(__file__).resolve().parents[2] / "locale" / "ru" / "LC_MESSAGES"
ENTRY = re.compile(r'^msgid ((?:"(?:[^"\\]|\\.)*"\n)+)msgstr ((?:"(?:[^"\\]|\\.)*"\n)+)', re.M)


def _text(block: str) -> str:
    return (
        "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', block)).replace('\\"', '"').replace("\\n", "\n")
    )


def test_every_message_is_translated_and_compiled() -> None:
    po = (LOCALE / "django.po").read_text(encoding="utf-8")
    assert "#, fuzzy" not in po.split("\n\n", 1)[1]
    pairs = [(_text(m.group(1)), _text(m.group(2))) for m in ENTRY.finditer(po)]
    pairs = [(msgid, msgstr) for msgid, msgstr in pairs if msgid]
    assert len(pairs) > 40
    untranslated = [msgid for msgid, msgstr in pairs if not msgstr]
    assert untranslated == []
    with (LOCALE / "django.mo").open("rb") as mo:
        compiled = gettext.GNUTranslations(mo)
    stale = [msgid for msgid, msgstr in pairs if compiled.gettext(msgid) != msgstr]
    assert stale == [], "run msgfmt: the .mo does not match the .po"


def test_every_plural_message_has_all_its_russian_forms() -> None:
    po = (LOCALE / "django.po").read_text(encoding="utf-8")
    plural_entries = re.findall(r"^msgid_plural .*\n((?:msgstr\[\d\] .*\n)+)", po, re.M)
    assert plural_entries
    for forms in plural_entries:
        assert len(re.findall(r"^msgstr\[\d\]", forms, re.M)) == 4  # nplurals=4
        assert 'msgstr[0] ""' not in forms and '] ""\n' not in forms
