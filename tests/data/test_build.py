"""End-to-end `build_dataset` on a small known corpus: fates, audit, outputs, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from data_corpus import small_options

from trustmoe.data import build as build_mod
from trustmoe.data.build import build_dataset, split_docs
from trustmoe.data.manifest import AUDIT_KEYS, verify
from trustmoe.data.shards import open_tokens
from trustmoe.data.tokenizer import load_tokenizer
from trustmoe.io import TrustmoeError


def _fates(out: Path) -> dict[str, tuple[str, str | None]]:
    man = json.loads((out / "manifest.json").read_text())
    return {e["path"]: (e["fate"], e["rule"]) for e in man["files"]}


def test_build_fates_and_audit(corpus: Path, eval_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    res = build_dataset([str(corpus)], out, small_options(eval_sets=(str(eval_set),)),
                        progress=False)
    fates = _fates(out)
    assert fates["z_copies/exact_copy.txt"] == ("dropped", "exact_duplicate")
    assert fates["z_copies/near_copy.txt"] == ("dropped", "near_duplicate")
    assert fates["blob.bin"] == ("dropped", "binary")
    assert fates["latin1.txt"] == ("dropped", "invalid_utf8")
    assert fates["short.txt"] == ("dropped", "too_short")
    assert fates["docs/doc000.txt"] == ("kept", None)
    assert fates["pii/contact.txt"] == ("kept", None)  # redacted, not dropped
    man = json.loads((out / "manifest.json").read_text())
    entry = next(e for e in man["files"] if e["path"] == "docs/doc003.txt")
    raw = (corpus / "docs/doc003.txt").read_bytes()
    assert entry["sha256"] == hashlib.sha256(raw).hexdigest()
    assert entry["bytes"] == len(raw) and entry["split"] in ("train", "val")
    assert entry["license"] == "NOASSERTION"  # no declaration, no header, no LICENSE file

    audit = json.loads((out / "audit.json").read_text())
    assert set(AUDIT_KEYS) <= set(audit)
    assert audit["dropped"]["corpus/latin1.txt"] == "invalid_utf8"
    assert audit["decode_errors"] == {"binary": 1, "invalid_utf8": 1}
    assert audit["near_duplicates"][0]["documents"] == [
        "corpus/docs/doc000.txt", "corpus/z_copies/near_copy.txt"]
    types = {p["type"] for p in audit["pii"]}
    assert {"EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "IP_ADDRESS", "KEY"} <= types
    assert all("jane.doe@example.org" not in p["masked"] for p in audit["pii"])
    [hit] = audit["contamination"]
    assert hit["documents"] == ["corpus/docs/doc007.txt"] and hit["item"] == 1
    assert "corpus/docs/doc007.txt" not in audit["dropped"]  # reported, not removed
    assert len(audit["licenses"]["undetermined"]) == len(fates)

    # redacted text reaches the shards with typed placeholders, never the raw values
    tok = load_tokenizer(out)
    text = tok.decode(np.concatenate([open_tokens(out, s) for s in ("train", "val")]).tolist())
    assert "<EMAIL>" in text and "<CREDIT_CARD>" in text and "<KEY>" in text
    assert "jane.doe@example.org" not in text and "AKIAIOSFODNN7EXAMPLE" not in text
    s = res.summary()
    assert s["kept"] + s["dropped"] == s["documents"] == len(fates)
    assert s["tokens"]["train"] == len(open_tokens(out, "train"))
    assert res.manifest_sha256 == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()


def test_decontaminate_and_licence_allow_list(corpus: Path, eval_set: Path,
                                              tmp_path: Path) -> None:
    (corpus / "docs/doc004.txt").write_text(
        "# SPDX-License-Identifier: GPL-3.0-only\n" + (corpus / "docs/doc004.txt").read_text())
    out = tmp_path / "ds"
    build_dataset([str(corpus)], out, small_options(
        eval_sets=(str(eval_set),), decontaminate=True, license="MIT",
        allow_licenses=("MIT",), pii="drop"), progress=False)
    fates = _fates(out)
    assert fates["docs/doc007.txt"] == ("dropped", "contaminated")
    assert fates["docs/doc004.txt"] == ("dropped", "license_not_allowed")
    assert fates["pii/contact.txt"] == ("dropped", "pii")
    man = json.loads((out / "manifest.json").read_text())
    doc4 = next(e for e in man["files"] if e["path"] == "docs/doc004.txt")
    assert doc4["license"] == "GPL-3.0-only" and doc4["declared_license"] == "MIT"
    sheet = (out / "DATASHEET.md").read_text()
    assert sheet.startswith("---\nlicense:\n- mit\n")
    for key in ("language:", "size_categories:", "source_datasets:", "task_categories:"):
        assert key in sheet.split("---")[1]
    for section in ("Motivation", "Composition", "Collection process", "Preprocessing",
                    "Uses", "Distribution", "Maintenance"):
        assert f". {section}" in sheet
    assert "| contaminated | 1 |" in sheet and "[QUESTION FOR OWNER]" in sheet
    assert "<html>" in (out / "audit.html").read_text()


def test_rebuild_is_byte_identical_and_verify(corpus: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build_dataset([str(corpus)], a, small_options(), progress=False)
    build_dataset([str(corpus)], b, small_options(), progress=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    assert verify(a)["ok"]
    # a source swapped after its audit, one added, one removed, an output tampered with
    (corpus / "docs/doc001.txt").write_text("swapped after the audit\n" * 5)
    (corpus / "docs/new.txt").write_text("appeared later\n")
    (corpus / "docs/doc002.txt").unlink()
    with open(a / "val.bin", "ab") as f:
        f.write(b"\0\0")
    r = verify(a)
    assert not r["ok"]
    assert r["changed"] == ["output:val.bin", "corpus/docs/doc001.txt"]
    assert r["appeared"] == ["corpus/docs/new.txt"]
    assert r["vanished"] == ["corpus/docs/doc002.txt"]


def test_interrupted_build_resumes_from_finished_stages(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = tmp_path / "ref"
    build_dataset([str(corpus)], ref, small_options(), progress=False)
    out = tmp_path / "ds"

    def crash(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "_shard_stage", crash)
    with pytest.raises(KeyboardInterrupt):
        build_dataset([str(corpus)], out, small_options(), progress=False)
    assert not out.exists()  # nothing half-written looks complete
    monkeypatch.undo()
    calls: list[str] = []
    for name in ("_rules_stage", "_tokenizer_stage"):
        orig = getattr(build_mod, name)

        def spy(*a: object, _orig: object = orig, _n: str = name, **k: object) -> object:
            calls.append(_n)
            return _orig(*a, **k)  # type: ignore[operator]

        monkeypatch.setattr(build_mod, name, spy)
    build_dataset([str(corpus)], out, small_options(), progress=False)
    assert calls == []  # rules and tokenizer came from the finished stages
    for n in ("manifest.json", "train.bin", "val.bin", "tokenizer.json", "audit.json"):
        assert (out / n).read_bytes() == (ref / n).read_bytes()
    assert not (tmp_path / ".ds.build").exists()


def test_bad_inputs_give_clear_errors(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    with pytest.raises(TrustmoeError, match="source not found"):
        build_dataset([str(tmp_path / "nope")], out, small_options(), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrustmoeError, match="no input files"):
        build_dataset([str(tmp_path / "empty")], out, small_options(), progress=False)
    with pytest.raises(TrustmoeError, match="unknown SPDX"):
        build_dataset([str(corpus)], out, small_options(license="NotALicence-9"),
                      progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine item with enough words to be indexed ok"}\n{"text": oops\n')
    with pytest.raises(TrustmoeError, match="line 2 is malformed JSON"):
        build_dataset([str(corpus)], out, small_options(eval_sets=(str(bad),)), progress=False)
    with pytest.raises(TrustmoeError, match="--pii"):
        build_dataset([str(corpus)], out, small_options(pii="shred"), progress=False)
    with pytest.raises(TrustmoeError, match="vocab"):
        build_dataset([str(corpus)], out, small_options(vocab_size=10**9), progress=False)
    assert not out.exists() and not (tmp_path / ".ds.build").exists()


def test_jsonl_source_records_and_split(tmp_path: Path) -> None:
    src = tmp_path / "recs.jsonl"
    rows = [{"body": f"record number {i} " * 8} for i in range(20)]
    lines = [json.dumps(r) for r in rows] + ["{broken", json.dumps({"other": 1})]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "ds"
    build_dataset([str(src)], out, small_options(text_field="body", dedup="off"),
                  progress=False)
    [entry] = json.loads((out / "manifest.json").read_text())["files"]
    fates = {d["doc"]: (d["fate"], d["rule"]) for d in entry["documents"]}
    assert fates["recs/recs.jsonl#1"] == ("kept", None)
    assert fates["recs/recs.jsonl#21"] == ("dropped", "malformed_record")
    assert fates["recs/recs.jsonl#22"] == ("dropped", "malformed_record")
    audit = json.loads((out / "audit.json").read_text())
    assert audit["decode_errors"] == {"malformed_record": 2}
    splits = [d["split"] for d in entry["documents"] if d["fate"] == "kept"]
    # 5% of 20 is 1, but at least min_val_docs (8) capped at a quarter of the corpus
    assert splits.count("val") == 5 and splits.count("train") == 15


def test_split_is_seeded_and_by_document() -> None:
    ids = [f"d{i}" for i in range(100)]
    a = split_docs(ids, seed=1, val_fraction=0.05)
    assert a == split_docs(list(reversed(ids)), seed=1, val_fraction=0.05) and len(a) == 5
    assert a != split_docs(ids, seed=2, val_fraction=0.05)
    assert split_docs(ids, seed=1, val_fraction=0.05, min_val_docs=8) >= a  # same order, more
    assert len(split_docs(ids[:10], seed=1, val_fraction=0.05, min_val_docs=8)) == 2
    assert len(split_docs(ids, seed=1, val_fraction=0.05, min_val_docs=40)) == 25
    assert split_docs(["only"], seed=0, val_fraction=0.0) == set()
    with pytest.raises(TrustmoeError, match="at least 2 are needed"):
        split_docs(["only"], seed=0, val_fraction=0.05)


def test_stdlib_subset_build(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    res = build_dataset(["stdlib"], out, small_options(include=("json/*.py",)), progress=False)
    man = json.loads((out / "manifest.json").read_text())
    paths = {e["path"] for e in man["files"]}
    assert "json/decoder.py" in paths and all(p.startswith("json/") for p in paths)
    assert {e["license"] for e in man["files"]} == {"PSF-2.0"}
    assert res.summary()["tokens"]["train"] > 10_000


def test_licence_sources_recorded(corpus: Path, tmp_path: Path) -> None:
    (corpus / "LICENSE").write_text("Permission is hereby granted, free of charge, to any "
                                    "person obtaining a copy of this software")
    (corpus / "docs/doc005.txt").write_text(
        "SPDX-License-Identifier: Apache-2.0\n" + (corpus / "docs/doc005.txt").read_text())
    out = tmp_path / "ds"
    build_dataset([str(corpus)], out, small_options(), progress=False)
    files = {e["path"]: e for e in json.loads((out / "manifest.json").read_text())["files"]}
    assert (files["docs/doc001.txt"]["license"], files["docs/doc001.txt"]["license_source"]) == (
        "MIT", "license_file")
    assert (files["docs/doc005.txt"]["license"], files["docs/doc005.txt"]["license_source"]) == (
        "Apache-2.0", "header")
    audit = json.loads((out / "audit.json").read_text())
    assert audit["licenses"]["undetermined"] == []
    assert audit["licenses"]["counts"]["MIT"] == len(files) - 1


def test_parquet_source_or_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "recs.parquet"
    try:
        import pyarrow as pa  # optional extra
        import pyarrow.parquet as pq
    except ImportError:
        src.write_bytes(b"PAR1 not really")
        with pytest.raises(TrustmoeError, match="needs pyarrow"):
            build_dataset([str(src)], tmp_path / "ds", small_options(), progress=False)
        return
    pq.write_table(pa.table({"text": [f"parquet row {i} " * 6 for i in range(12)]}), src)
    build_dataset([str(src)], tmp_path / "ds", small_options(dedup="off"), progress=False)
    [entry] = json.loads((tmp_path / "ds" / "manifest.json").read_text())["files"]
    assert [d["fate"] for d in entry["documents"]] == ["kept"] * 12


def test_everything_dropped_is_a_clear_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"\x00\x01\x02" * 100)
    (src / "b.txt").write_text("x")
    with pytest.raises(TrustmoeError, match=r"no documents left .*binary 1, too_short 1"):
        build_dataset([str(src)], tmp_path / "ds", small_options(), progress=False)
    assert not (tmp_path / "ds").exists()


def test_given_tokenizer_is_used_as_is(corpus: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    build_dataset([str(corpus)], first, small_options(), progress=False)
    second = tmp_path / "second"
    build_dataset([str(corpus / "docs")], second, small_options(
        tokenizer=str(first / "tokenizer.json"), vocab_size=4096), progress=False)
    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    tok = load_tokenizer(second)
    doc = (corpus / "docs/doc010.txt").read_text()
    ids = open_tokens(second, "train").tolist() + open_tokens(second, "val").tolist()
    assert tok.decode(ids).count(doc.strip()) == 1  # encoded with the given vocabulary


def test_unreadable_file_is_counted_not_fatal(corpus: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.read_bytes

    def flaky(self: Path) -> bytes:
        if self.name == "doc012.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", flaky)
    out = tmp_path / "ds"
    build_dataset([str(corpus)], out, small_options(), progress=False)
    assert _fates(out)["docs/doc012.txt"] == ("dropped", "unreadable")
    assert json.loads((out / "audit.json").read_text())["decode_errors"]["unreadable"] == 1
