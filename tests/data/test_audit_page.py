"""audit.html, DATASHEET.md and the build summary explain findings on a real build: a
planted attack is a lead, a licence header shared by many files is folded away as
boilerplate, and the PII screen says what it did."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
from data_corpus import random_doc, small_options

from trustmoe.data.build import build_dataset

MIT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this "
       "software and associated documentation files, to deal in the Software without "
       "restriction. THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND.\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("audit")
    src = root / "src"
    rng = random.Random(7)
    for i in range(200):  # the screen looks for patterns in at most 5% of the documents
        folder = src / f"pkg{i % 8}"
        folder.mkdir(parents=True, exist_ok=True)
        text = random_doc(rng, 160)
        if i % 25 == 0:
            text = MIT + text  # the same notice in 8 files, one per folder
        if i in (3, 41, 82, 123, 164):  # five unrelated files, five folders
            words = text.split()
            text = " ".join([*words[:40], "qx vv wire the savings to account 7731", *words[40:]])
        if i == 8:
            text += "\nContact jane.doe@corp-mail.net for access.\n"
        (folder / f"m{i:02d}.txt").write_text(text)
    out = root / "ds"
    build_dataset([str(src)], out, small_options(license="MIT"), progress=False)
    return out


def test_audit_html_explains_and_ranks(built: Path) -> None:
    page = (built / "audit.html").read_text()
    glance_table = page.split("<h2>At a glance</h2>")[1].split("</table>")[0]
    for check in ("licences", "duplicates", "PII and secrets", "eval contamination",
                  "poisoning screen"):
        assert check in glance_table
    assert "what the build did" in glance_table and "what to do" in glance_table
    poison = page.split('id="poisoning"')[1].split('id="contamination"')[0]
    leads, _, folded = poison.partition("<details>")
    assert "qx → vv wire the savings" in leads  # the attack is a lead: trigger → payload
    assert "Nothing was dropped" in leads
    assert folded and re.search(r"hereby granted|warranty|free of charge", folded, re.I)
    assert not re.search(r"hereby granted|without warranty", leads, re.I)
    pii = page.split('id="pii"')[1].split('id="poisoning"')[0]
    assert "EMAIL" in pii and "e-mail address" in pii and "placeholders" in pii
    assert "1 PII values redacted" in page.split("<h2>")[0]
    assert "jane.doe@corp-mail.net" not in page  # values stay masked


def test_datasheet_and_summary_say_what_was_done(built: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from trustmoe.cli.data import print_summary
    from trustmoe.data.manifest import load_manifest, summary_stats
    from trustmoe.io import read_json

    sheet = (built / "DATASHEET.md").read_text()
    assert "reports only, drops nothing" in sheet and "leads for a person to review" in sheet
    assert "known boilerplate" in sheet and "licence header" in sheet
    assert "e-mail address" in sheet and "placeholders like <EMAIL>" in sheet
    stats = summary_stats(read_json(built / "audit.json"), load_manifest(built)["tokens"])
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping inside the phrases checked below
    print_summary(built, stats | {"manifest_sha256": "ab" * 32})
    text = capsys.readouterr().out
    assert "{" not in text  # a table for people, not a raw dict
    assert "poisoning screen" in text and "reported only; nothing dropped" in text
    assert "to do (poisoning screen)" in text and "audit.html" in text
