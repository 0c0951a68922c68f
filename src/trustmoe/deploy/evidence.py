"""A version's evidence: the metadata stored with it and the flat metrics its gates read.

Everything is read from the files as staged for storing (copied and hashed once), never from
the source dirs a second time, so the record describes exactly what the registry holds:

    model dir trustmoe.json   dataset manifest SHA-256, training args, preset, steps, metrics
    eval dir eval.json        perplexity, calibration (ECE), attack, membership; its
                              `model.weights_sha256` must match the registered weights
    security dir              security.json's summary (findings, worst severity)
    dataset dir (optional)    audit.json contamination hits, if its manifest.json hashes to
                              the model's dataset manifest SHA-256

eval.json and security.json change shape as their stages grow, so every metric is looked up
along several key paths (a flat `summary` block first) and a metric that is found nowhere is
recorded as missing *with the reason*, for the gates to report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trustmoe.deploy.blobs import BlobStore, FileEntry
from trustmoe.deploy.db import RegistryError
from trustmoe.io import sha256_file

SEVERITIES = ("none", "info", "low", "medium", "high", "critical")
Number = float | int

# metric -> key paths into eval.json, tried in order (the first numeric value wins)
EVAL_PATHS: dict[str, Sequence[str]] = {
    "perplexity": ("summary.perplexity", "perplexity.perplexity", "perplexity"),
    "bits_per_byte": ("summary.bits_per_byte", "perplexity.bits_per_byte"),
    # ECE of the model as served (T = 1), and after eval's fitted temperature
    "ece": ("summary.ece", "calibration.next_token.test_before.ece_15_equal_width"),
    "ece_after_temperature": ("summary.ece_after_temperature",
                              "calibration.next_token.test_after.ece_15_equal_width"),
    "contamination_hits": ("summary.contamination_hits", "contamination.hits"),
    "quantized_perplexity_delta": ("summary.quantized_perplexity_delta",
                                   "quantization.perplexity_delta",
                                   "quantized.perplexity_delta"),
    "attack_success_rate": ("summary.attack_success_rate", "attack.attack_success_rate"),
    "membership_max_auroc": ("summary.membership_auroc", "membership.max_auroc"),
    "accuracy": ("summary.accuracy",),
    "ood_auroc": ("summary.ood_auroc",),
}
# `trustmoe security scan` writes summary.max_exposure, mia_*, backdoor_suspects, findings_level
SECURITY_PATHS: dict[str, Sequence[str]] = {
    "security_findings": ("summary.findings", "summary.findings_total", "summary.n_findings"),
    "canary_exposure_max": ("summary.max_exposure", "summary.canary_exposure_max"),
    "canaries_extracted": ("summary.canaries_extracted",),
    "mia_auroc": ("summary.mia_auroc",),
    "mia_tpr_at_1pct_fpr": ("summary.mia_tpr_at_1pct_fpr", "summary.membership_tpr_at_1pct_fpr"),
    "backdoor_suspects": ("summary.backdoor_suspects",),
}
METRICS = (*EVAL_PATHS, *SECURITY_PATHS, "security_max_severity")


def lookup(doc: Any, path: str) -> Any:
    """`doc["a"]["b"]` for path "a.b", or None where any step is missing."""
    cur = doc
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _number(v: Any) -> Number | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return v if math.isfinite(v) else None


Reader = Callable[[FileEntry], bytes]


def store_reader(store: BlobStore) -> Reader:
    return lambda e: store.blob_path(e.sha256).read_bytes()


def read_json_part(read: Reader, entries: list[FileEntry], name: str, what: str) -> Any:
    """The parsed JSON file `name` among `entries` (read through `read`), or None if absent."""
    e = next((e for e in entries if e.path == name), None)
    if e is None:
        return None
    try:
        return json.loads(read(e).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RegistryError(f"{what}/{name} is not valid JSON ({err}); refusing it") from None


def _from_paths(doc: Any, table: dict[str, Sequence[str]], source: str,
                metrics: dict[str, Any], missing: dict[str, str]) -> None:
    for metric, paths in table.items():
        if doc is None:
            missing.setdefault(metric, f"no {source} was registered with this version")
            continue
        for p in paths:
            v = _number(lookup(doc, p))
            if v is not None:
                metrics[metric] = v
                missing.pop(metric, None)
                break
        else:
            if metric not in metrics:
                missing[metric] = f"{source} has none of {', '.join(paths)}"


def _severity(sec: Any, metrics: dict[str, Any], missing: dict[str, str]) -> None:
    if sec is None:
        missing["security_max_severity"] = "no security.json was registered with this version"
        return
    sev = lookup(sec, "summary.max_severity")
    if sev is None:
        sev = lookup(sec, "summary.findings_level")  # `trustmoe security scan`
    findings = sec.get("findings") if isinstance(sec, dict) else None
    if sev is None and isinstance(findings, list):
        levels = [str(f.get("severity", "")).lower() for f in findings if isinstance(f, dict)]
        known = [s for s in levels if s in SEVERITIES]
        sev = max(known, key=SEVERITIES.index) if known else "none"
        metrics.setdefault("security_findings", len(findings))
        missing.pop("security_findings", None)
    if isinstance(sev, str) and sev.lower() in SEVERITIES:
        metrics["security_max_severity"] = sev.lower()
    else:
        missing["security_max_severity"] = ("security.json has no summary.max_severity, no "
                                             "summary.findings_level and no findings list with "
                                             "severities")


def _contamination(ev: Any, audit: dict[str, Any] | None, metrics: dict[str, Any],
                   missing: dict[str, str]) -> None:
    """`contamination_hits`: the evaluated task items eval found in the training split plus
    the eval-set items the dataset's own audit found (eval.json's copy, else the audit's)."""
    ds = _number(lookup(ev, "summary.dataset_contamination_hits")) if ev is not None else None
    if ds is None and audit is not None:
        ds = _number(audit.get("contamination_hits"))
    if ds is None:
        return
    metrics["contamination_hits"] = metrics.get("contamination_hits", 0) + ds
    missing.pop("contamination_hits", None)


def dataset_audit(data_dir: Path | None, dataset_sha: str | None) -> dict[str, Any] | None:
    """Contamination hits and audit counts of the training dataset, when its manifest is the
    one the model names (else None: the dir is gone, moved, or a different dataset)."""
    if data_dir is None or dataset_sha is None:
        return None
    manifest, audit = Path(data_dir) / "manifest.json", Path(data_dir) / "audit.json"
    if not manifest.is_file() or not audit.is_file() or sha256_file(manifest) != dataset_sha:
        return None
    try:
        man = json.loads(manifest.read_text(encoding="utf-8"))
        aud = json.loads(audit.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    out: dict[str, Any] = {"dir": str(Path(data_dir).absolute()), "counts": man.get("counts")}
    if isinstance(aud.get("contamination_index"), dict):
        decontaminated = bool(lookup(man, "options.decontaminate"))
        found = aud.get("contamination") or []
        out["contamination_checked_items"] = aud["contamination_index"].get("items")
        out["contamination_hits"] = 0 if decontaminated else len(found)
        out["decontaminated"] = decontaminated
    return out


def build_metadata(read: Reader, parts: dict[str, list[FileEntry]],
                   digests: dict[str, str], sources: dict[str, Path],
                   data_dir: Path | None, notice: Callable[[str], None]) -> dict[str, Any]:
    """The metadata record of a new version (JSON-safe), read from the files as staged."""
    tm = read_json_part(read, parts["model"], "trustmoe.json", str(sources["model"])) or {}
    cfg = read_json_part(read, parts["model"], "config.json", str(sources["model"])) or {}
    if not isinstance(tm, dict) or not isinstance(cfg, dict):
        raise RegistryError(f"{sources['model']}: trustmoe.json and config.json must be JSON "
                            "objects")
    dataset_sha = tm.get("dataset_manifest_sha256")
    meta: dict[str, Any] = {
        "schema": 1,
        "dataset_manifest_sha256": dataset_sha if isinstance(dataset_sha, str) else None,
        "train_args": tm.get("train_args"),
        "training": {k: tm.get(k) for k in ("preset", "step", "tokens", "metrics", "data_dir",
                                             "world_size", "device") if k in tm},
        "model_config": {k: cfg.get(k) for k in (
            "model_type", "hidden_size", "num_hidden_layers", "num_local_experts",
            "num_experts_per_tok", "vocab_size", "max_position_embeddings") if k in cfg},
        "digests": dict(digests),
        "files": {part: {"count": len(es), "bytes": sum(e.size for e in es)}
                  for part, es in parts.items()},
        "sources": {k: str(Path(v).absolute()) for k, v in sources.items()},
    }
    if not meta["dataset_manifest_sha256"]:
        notice("the model's trustmoe.json names no dataset manifest SHA-256 (lineage unknown)")
    ev = read_json_part(read, parts["eval"], "eval.json", str(sources.get("eval"))) \
        if "eval" in parts else None
    if "eval" in parts and not isinstance(ev, dict):
        raise RegistryError(f"{sources['eval']} is not an eval dir: no eval.json object in it")
    sec = None
    if "security" in parts:
        sec = read_json_part(read, parts["security"], "security.json", str(sources["security"]))
        if not isinstance(sec, dict):
            raise RegistryError(f"{sources['security']} is not a security dir: no "
                                "security.json object in it")
    if ev is not None:
        _check_eval_matches(ev, parts["model"], sources)
        meta["eval"] = {"summary": ev.get("summary"), "data_manifest_sha256": lookup(
            ev, "data.manifest_sha256"), "settings": ev.get("settings"),
            "has_profile": any(e.path.startswith("profile.") for e in parts["eval"])}
    if sec is not None:
        meta["security"] = {"summary": sec.get("summary")}
    metrics: dict[str, Any] = {}
    missing: dict[str, str] = {}
    _from_paths(ev, EVAL_PATHS, "eval.json", metrics, missing)
    _from_paths(sec, SECURITY_PATHS, "security.json", metrics, missing)
    _severity(sec, metrics, missing)
    audit = dataset_audit(data_dir or _data_dir_hint(tm), meta["dataset_manifest_sha256"])
    if audit is not None:
        meta["dataset_audit"] = audit
    _contamination(ev, audit, metrics, missing)
    if "contamination_hits" in missing:
        missing["contamination_hits"] += (
            "; and no dataset audit with a contamination check matched the model's dataset "
            "manifest (pass --data DATA_DIR)")
    meta["metrics"] = metrics
    meta["metrics_missing"] = missing
    return meta


def _data_dir_hint(tm: dict[str, Any]) -> Path | None:
    d = tm.get("data_dir")
    return Path(d) if isinstance(d, str) and d else None


def _check_eval_matches(ev: dict[str, Any], model: list[FileEntry], sources: dict[str, Path]
                        ) -> None:
    """An eval dir must be the evaluation of these weights, not of some other model."""
    claimed = lookup(ev, "model.weights_sha256")
    weights = next((e for e in model if e.path == "model.safetensors"), None)
    if isinstance(claimed, str) and weights is not None and claimed != weights.sha256:
        raise RegistryError(
            f"{sources['eval']} evaluated other weights (model.safetensors {claimed[:12]}...) "
            f"than {sources['model']} holds ({weights.sha256[:12]}...); re-run `trustmoe eval`")
