"""`manifest.json`: every input file's fate, the outputs' hashes, and `trustmoe data verify`.

The manifest lists each input file (path relative to its source, bytes, SHA-256, licence and
fate), the sources and options of the build, the token shards, and the SHA-256 of every other
output file. The SHA-256 of `manifest.json` itself names the dataset. `verify` re-hashes the
sources and outputs and reports every file that changed, appeared or vanished.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from trustmoe.data import sources
from trustmoe.io import TrustmoeError, atomic_write_json, read_json, sha256_file

OUTPUT_FILES = ("tokenizer.json", "tokenizer_config.json", "train.bin", "val.bin", "audit.json",
                "DATASHEET.md", "audit.html", "canaries.json")
AUDIT_KEYS = ("near_duplicates", "exact_duplicates", "pii", "contamination", "poisoning",
              "licenses", "dropped")


def _file_entries(files: dict[str, list[sources.InputFile]], docs: list[list[Any]],
                  splits: dict[str, str], declared: dict[str, str | None]) -> list[dict[str, Any]]:
    by_file: dict[str, list[list[Any]]] = {}
    for rec in docs:
        by_file.setdefault(rec[0].split("#", 1)[0], []).append(rec)
    out = []
    for src, fs in files.items():
        for f in fs:
            fid = f"{src}/{f.path}"
            recs = by_file.get(fid, [])
            entry: dict[str, Any] = {
                "source": src, "path": f.path, "bytes": f.bytes,
                "sha256": f.sha256 if f.bytes >= 0 else None,
                "license": recs[0][1] if recs else None,
                "license_source": recs[0][5] if recs else None,
                "declared_license": declared[src],
            }
            if len(recs) == 1 and "#" not in recs[0][0]:
                _, _, fate, rule, changes, _ = recs[0]
                entry.update(fate=fate, rule=rule, split=splits.get(fid))
                if changes:
                    entry["changes"] = changes
            else:
                kept = [r for r in recs if r[2] == "kept"]
                entry["fate"] = "kept" if kept else "dropped"
                entry["rule"] = None if kept else ("empty" if not recs else "all_records_dropped")
                entry["documents"] = [
                    {"doc": r[0], "fate": r[2], "rule": r[3], "split": splits.get(r[0])}
                    | ({"changes": r[4]} if r[4] else {}) for r in recs
                ]
            out.append(entry)
    return out


def write_outputs(tmp: Path, specs: list[sources.SourceSpec],
                  files: dict[str, list[sources.InputFile]], audit: dict[str, Any],
                  shard_info: dict[str, Any], opts: Any, declared: str | None
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write audit.json, DATASHEET.md, audit.html and manifest.json into `tmp`."""
    from trustmoe.data import card

    docs = audit.pop("_docs")
    public_audit = {k: v for k, v in audit.items() if not k.startswith("_")}
    for k in AUDIT_KEYS:
        public_audit.setdefault(k, [] if k not in ("licenses", "dropped") else {})
    atomic_write_json(tmp / "audit.json", public_audit)
    decl = {s.name: declared or (sources.STDLIB_LICENSE if s.kind == "stdlib" else None)
            for s in specs}
    entries = _file_entries(files, docs, shard_info["splits"], decl)
    stats = summary_stats(public_audit, shard_info["tokens"])
    card.write_datasheet(tmp / "DATASHEET.md", specs, public_audit, shard_info["tokens"], opts,
                         decl, [r[0] for r in docs if r[2] == "kept"])
    card.write_html(tmp / "audit.html", public_audit, stats)
    opts_json = asdict(opts)
    manifest = {
        "format": "trustmoe-dataset/1",
        "sources": [
            {"name": s.name, "kind": s.kind, "root": str(s.root), "include": list(s.include),
             "exclude": list(s.exclude), "text_field": s.text_field,
             "declared_license": decl[s.name]} for s in specs
        ],
        "options": opts_json,
        "files": entries,
        "tokens": shard_info["tokens"],
        "counts": public_audit["counts"],
        "canaries": shard_info.get("canaries"),  # planted secrets (data/canaries.py) or None
        "outputs": {name: sha256_file(tmp / name) for name in OUTPUT_FILES
                    if (tmp / name).exists()},
    }
    atomic_write_json(tmp / "manifest.json", manifest)
    return manifest, stats


def summary_stats(audit: dict[str, Any], tokens: dict[str, Any]) -> dict[str, Any]:
    c = audit["counts"]
    return {
        "documents": c["documents"], "kept": c["kept"], "dropped": c["dropped"],
        "dropped_by_rule": c["dropped_by_rule"],
        "tokens": {"train": tokens["train"], "val": tokens["val"]},
        "vocab_size": tokens["vocab_size"],
        "audit": {
            "exact_duplicate_groups": len(audit["exact_duplicates"]),
            "near_duplicate_clusters": len(audit["near_duplicates"]),
            "pii_findings": len(audit["pii"]),
            "contaminated_eval_items": len(audit["contamination"]),
            "poisoning_findings": len(audit["poisoning"]),
            "poisoning_by_kind": dict(sorted(Counter(f["kind"] for f in audit["poisoning"]).items())),
            "undetermined_licenses": len(audit["licenses"].get("undetermined", [])),
            "decode_errors": sum(audit.get("decode_errors", {}).values()),
        },
    }


def load_manifest(data_dir: Path) -> dict[str, Any]:
    man = read_json(Path(data_dir) / "manifest.json", "dataset manifest")
    if not isinstance(man, dict) or man.get("format") != "trustmoe-dataset/1":
        raise TrustmoeError(f"{data_dir}/manifest.json is not a trustmoe dataset manifest")
    return man


def verify(data_dir: Path) -> dict[str, Any]:
    """Re-hash sources and outputs; return {"ok", "changed", "appeared", "vanished"} lists."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise TrustmoeError(f"data directory not found: {data_dir}")
    man = load_manifest(data_dir)
    changed: list[str] = []
    appeared: list[str] = []
    vanished: list[str] = []
    for name, sha in sorted(man["outputs"].items()):
        p = data_dir / name
        if not p.exists():
            vanished.append(f"output:{name}")
        elif sha256_file(p) != sha:
            changed.append(f"output:{name}")
    expected = {f"{e['source']}/{e['path']}": e for e in man["files"]}
    for s in man["sources"]:
        spec = sources.SourceSpec(s["name"], s["kind"], Path(s["root"]), tuple(s["include"]),
                                  tuple(s["exclude"]), s.get("text_field", "text"))
        if not spec.root.exists():
            vanished.extend(k for k, e in expected.items() if e["source"] == spec.name)
            continue
        seen = {f"{f.source}/{f.path}": f for f in sources.list_files(spec)}
        for k, e in expected.items():
            if e["source"] != spec.name:
                continue
            f = seen.get(k)
            if f is None:
                vanished.append(k)
            elif f.sha256 != e["sha256"] or f.bytes != e["bytes"]:
                changed.append(k)
        appeared.extend(sorted(k for k in seen if k not in expected))
    ok = not (changed or appeared or vanished)
    return {"ok": ok, "manifest_sha256": sha256_file(data_dir / "manifest.json"),
            "files_checked": len(expected), "changed": changed, "appeared": appeared,
            "vanished": vanished}
