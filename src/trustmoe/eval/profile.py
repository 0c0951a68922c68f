"""The reference profile the monitor compares live traffic with: `profile.safetensors` + `profile.json`.

`trustmoe eval` writes one into every eval dir, from held-out documents of the dataset taken
as prompts; `trustmoe monitor profile` builds one from logged traffic instead. Per request it
keeps exactly what `trustmoe.engine.features.RequestFeatures` holds, so the detectors can
re-sample whole reference requests when they calibrate their thresholds.

profile.safetensors (all per request unless noted; N requests, d hidden, L MoE layers, E experts):
    token_ids (sum of lengths,) int64 and token_offsets (N + 1,) int64: the prompts, flat
    token_counts (V,) int64: token frequency histogram over all prompts
    prompt_tokens (N,) int64; mean_nll, mean_entropy, mean_top1 (N,) float64
    hidden (N, d) float32: mean-pooled final hidden states
    routing (N, L, E) int64: expert assignments (MoE models only)
profile.json: schema, shapes, `max_scored`, where the prompts came from, the model's weights
    sha256 and dataset manifest sha256 (the chain back to the data), summaries for people,
    and the sha256 of profile.safetensors (checked on load).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trustmoe.engine.features import MAX_SCORED, RequestFeatures, features_to_arrays
from trustmoe.io import (
    TrustmoeError,
    atomic_write_bytes,
    atomic_write_json,
    json_safe,
    read_json,
    sha256_bytes,
    sha256_file,
)

if TYPE_CHECKING:
    from trustmoe.model.transformer import Transformer

SCHEMA = 1
PROFILE_FILE = "profile.safetensors"
PROFILE_JSON = "profile.json"
SCALARS = ("prompt_tokens", "mean_nll", "mean_entropy", "mean_top1")


@dataclass
class Profile:
    token_ids: np.ndarray  # (total,) int64
    token_offsets: np.ndarray  # (N + 1,) int64
    token_counts: np.ndarray  # (V,) int64
    prompt_tokens: np.ndarray  # (N,) int64
    mean_nll: np.ndarray  # (N,) float64, nan where no position was scored
    mean_entropy: np.ndarray  # (N,)
    mean_top1: np.ndarray  # (N,)
    n_scored: np.ndarray  # (N,) int64 scored positions per request
    hidden: np.ndarray  # (N, d) float32
    routing: np.ndarray | None  # (N, L, E) int64
    meta: dict[str, Any] = field(default_factory=dict)
    ref: str = ""  # where it was loaded from: "<dir>#sha256:<safetensors sha256>"

    @property
    def n_requests(self) -> int:
        return int(self.prompt_tokens.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def routing_shape(self) -> tuple[int, int] | None:
        return None if self.routing is None else (int(self.routing.shape[1]), int(self.routing.shape[2]))

    @property
    def vocab_size(self) -> int:
        return int(self.token_counts.shape[0])

    def prompt(self, i: int) -> np.ndarray:
        return self.token_ids[self.token_offsets[i]:self.token_offsets[i + 1]]

    def request(self, i: int) -> RequestFeatures:
        """Request i as features (what the engine would have emitted for it)."""
        return RequestFeatures(
            token_ids=self.prompt(i), mean_nll=float(self.mean_nll[i]),
            mean_entropy=float(self.mean_entropy[i]), mean_top1=float(self.mean_top1[i]),
            hidden=self.hidden[i], routing=None if self.routing is None else self.routing[i],
            n_scored=int(self.n_scored[i]))

    def scalars(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).astype(np.float64) for k in SCALARS}


def build_profile(feats: Sequence[RequestFeatures], vocab_size: int, source: dict[str, Any],
                  max_scored: int = MAX_SCORED) -> Profile:
    """A profile from per-request features; `source` says where the prompts and model came from."""
    if len(feats) < 2:
        raise TrustmoeError(f"a profile needs at least 2 requests, got {len(feats)}")
    arr = features_to_arrays(feats)
    if arr["token_ids"].size and int(arr["token_ids"].max()) >= vocab_size:
        raise TrustmoeError(f"prompt token ids exceed the vocabulary size {vocab_size}")
    counts = np.bincount(arr["token_ids"], minlength=vocab_size).astype(np.int64)
    p = Profile(token_ids=arr["token_ids"], token_offsets=arr["token_offsets"], token_counts=counts,
                prompt_tokens=arr["prompt_tokens"], mean_nll=arr["mean_nll"],
                mean_entropy=arr["mean_entropy"], mean_top1=arr["mean_top1"],
                n_scored=arr["n_scored"], hidden=arr["hidden"], routing=arr.get("routing"))
    p.meta = {"schema": SCHEMA, "created": time.time(), "n_requests": p.n_requests,
              "vocab_size": vocab_size, "hidden_size": p.hidden_size,
              "routing_shape": list(p.routing_shape) if p.routing_shape else None,
              "max_scored": max_scored, "source": source, "summary": summarize(p)}
    return p


def _quantiles(x: np.ndarray) -> dict[str, float | None]:
    x = x[np.isfinite(x)]
    if not x.size:
        return {"mean": None, "p05": None, "p50": None, "p95": None}
    q = np.quantile(x, [0.05, 0.5, 0.95])
    return {"mean": float(x.mean()), "p05": float(q[0]), "p50": float(q[1]), "p95": float(q[2])}


def summarize(p: Profile) -> dict[str, Any]:
    """What a person reads in profile.json: distributions in a few numbers."""
    out: dict[str, Any] = {k: _quantiles(v) for k, v in p.scalars().items()}
    top = np.argsort(-p.token_counts, kind="stable")[:20]
    total = max(int(p.token_counts.sum()), 1)
    out["top_tokens"] = [[int(t), round(int(p.token_counts[t]) / total, 6)] for t in top
                         if p.token_counts[t] > 0]
    out["distinct_tokens"] = int((p.token_counts > 0).sum())
    if p.routing is not None:
        load = p.routing.sum(0).astype(np.float64)  # (L, E)
        out["routing_load"] = (load / np.maximum(load.sum(1, keepdims=True), 1)).round(6).tolist()
    return out


def save_profile(p: Profile, out_dir: Path) -> Path:
    """Write profile.safetensors then profile.json (which names its sha256), each atomically."""
    from safetensors.numpy import save

    tensors = {"token_ids": p.token_ids, "token_offsets": p.token_offsets,
               "token_counts": p.token_counts, "prompt_tokens": p.prompt_tokens,
               "mean_nll": p.mean_nll, "mean_entropy": p.mean_entropy, "mean_top1": p.mean_top1,
               "n_scored": p.n_scored, "hidden": p.hidden}
    if p.routing is not None:
        tensors["routing"] = p.routing
    blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / PROFILE_FILE, blob)
    meta = {**p.meta, "safetensors_sha256": sha256_bytes(blob)}
    atomic_write_json(out_dir / PROFILE_JSON, json_safe(meta))
    p.meta, p.ref = meta, f"{out_dir}#sha256:{meta['safetensors_sha256']}"
    return out_dir / PROFILE_JSON


_SPECS: dict[str, tuple[str, int]] = {  # name -> (dtype kind, ndim)
    "token_ids": ("i", 1), "token_offsets": ("i", 1), "token_counts": ("i", 1),
    "prompt_tokens": ("i", 1), "mean_nll": ("f", 1), "mean_entropy": ("f", 1),
    "mean_top1": ("f", 1), "n_scored": ("i", 1), "hidden": ("f", 2), "routing": ("i", 3),
}


def load_profile(path: Path) -> Profile:
    """Load and check a profile from an eval dir (or a dir holding the two profile files)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    d = Path(path)
    if d.is_file():
        d = d.parent
    if not d.is_dir():
        raise TrustmoeError(f"profile directory not found: {path}")
    if not (d / PROFILE_JSON).exists():
        hint = " (an eval dir from before profiles: re-run `trustmoe eval`)" if (d / "eval.json").exists() else ""
        raise TrustmoeError(f"no {PROFILE_JSON} in {d}{hint}")
    meta = read_json(d / PROFILE_JSON, "profile.json")
    if not isinstance(meta, dict) or meta.get("schema") != SCHEMA:
        raise TrustmoeError(f"{d / PROFILE_JSON}: unknown profile schema "
                            f"{meta.get('schema') if isinstance(meta, dict) else meta!r}; expected {SCHEMA}")
    blob_path = d / PROFILE_FILE
    if not blob_path.exists():
        raise TrustmoeError(f"{blob_path} is missing (profile.json names it)")
    digest = sha256_file(blob_path)
    if digest != meta.get("safetensors_sha256"):
        raise TrustmoeError(f"{blob_path} does not match the sha256 in profile.json: the profile "
                            "was modified or only partly written")
    try:
        t = load(blob_path.read_bytes())
    except SafetensorError as e:
        raise TrustmoeError(f"{blob_path} is not a valid safetensors file: {e}") from None
    for name, (kind, ndim) in _SPECS.items():
        if name not in t:
            if name == "routing":
                continue
            raise TrustmoeError(f"{blob_path} has no tensor {name!r}")
        if t[name].dtype.kind != kind or t[name].ndim != ndim:
            raise TrustmoeError(f"{blob_path}: tensor {name!r} has dtype {t[name].dtype} and "
                                f"{t[name].ndim} dims; expected kind {kind!r}, {ndim} dims")
    p = Profile(token_ids=t["token_ids"].astype(np.int64), token_offsets=t["token_offsets"].astype(np.int64),
                token_counts=t["token_counts"].astype(np.int64), prompt_tokens=t["prompt_tokens"].astype(np.int64),
                mean_nll=t["mean_nll"].astype(np.float64), mean_entropy=t["mean_entropy"].astype(np.float64),
                mean_top1=t["mean_top1"].astype(np.float64),
                n_scored=t["n_scored"].astype(np.int64), hidden=t["hidden"].astype(np.float32),
                routing=t["routing"].astype(np.int64) if "routing" in t else None, meta=meta,
                ref=f"{d}#sha256:{digest}")
    _check(p, blob_path)
    return p


def _check(p: Profile, where: Path) -> None:
    n = p.n_requests
    bad = None
    if n < 2:
        bad = f"holds {n} requests; at least 2 are needed"
    elif any(getattr(p, k).shape[0] != n for k in (*SCALARS, "n_scored")) or p.hidden.shape[0] != n:
        bad = "per-request tensors disagree on the number of requests"
    elif p.token_offsets.shape[0] != n + 1 or p.token_offsets[0] != 0 \
            or np.any(np.diff(p.token_offsets) != p.prompt_tokens) \
            or p.token_offsets[-1] != p.token_ids.shape[0]:
        bad = "token_offsets do not match prompt_tokens and token_ids"
    elif p.token_ids.size and (p.token_ids.min() < 0 or p.token_ids.max() >= p.vocab_size):
        bad = f"token ids fall outside the vocabulary of {p.vocab_size}"
    elif np.any(p.prompt_tokens < 1):
        bad = "a request has an empty prompt"
    elif not np.isfinite(p.hidden).all():
        bad = "hidden states hold NaN or infinity"
    elif p.routing is not None and (p.routing.shape[0] != n or p.routing.min() < 0):
        bad = "routing counts have the wrong number of requests or negative counts"
    elif p.meta.get("hidden_size") != p.hidden_size:
        bad = f"profile.json says hidden size {p.meta.get('hidden_size')}, the tensors {p.hidden_size}"
    if bad:
        raise TrustmoeError(f"{where}: {bad}")


def profile_from_prompts(model: Transformer, prompts: Sequence[Sequence[int]], source: dict[str, Any], *,
                         batch_size: int = 16, max_scored: int = MAX_SCORED) -> Profile:
    """Run the model over prompts (token ids) and build their profile."""
    from trustmoe.engine.features import features_from_model

    feats = features_from_model(model, prompts, batch_size=batch_size, max_scored=max_scored)
    return build_profile(feats, model.config.vocab_size, source, max_scored)


def write_eval_profile(model: Transformer, model_dir: Path, data_dir: Path, tokenizer: Path,
                       out_dir: Path, *, quick: bool, seed: int = 0, batch_size: int = 16,
                       eval_dir: Path | None = None) -> Path:
    """`trustmoe eval`'s profile: held-out documents of the dataset, each taken as one prompt.
    Written into `out_dir`; `eval_dir` is the eval dir it will live in (default `out_dir`).

    512 documents (128 with --quick) of at most 256 tokens (the model's context if shorter),
    sampled with a seed of their own so they do not depend on the other eval samples.
    """
    from trustmoe.eval.corpus import load_corpus

    n, max_tokens = (128 if quick else 512), min(256, model.config.max_position_embeddings)
    from trustmoe.data.tokenizer import TextCodec

    corpus = load_corpus(Path(data_dir), TextCodec.from_dir(tokenizer), n_train=0, n_val=n, seed=seed + 104729,
                         max_tokens=max_tokens)
    weights = Path(model_dir) / "model.safetensors"
    manifest = Path(data_dir) / "manifest.json"
    eval_manifest = sha256_file(manifest) if manifest.exists() else None
    source = {"kind": "eval", "prompts": "held-out documents", "eval_dir": str(eval_dir or out_dir),
              "model_dir": str(model_dir), "data_dir": str(data_dir),
              "model_sha256": sha256_file(weights) if weights.exists() else None,
              "dataset_manifest_sha256": trained_on(Path(model_dir)) or eval_manifest,
              "eval_data_manifest_sha256": eval_manifest,
              "tokenizer_sha256": sha256_file(tokenizer), "seed": seed, "max_tokens": max_tokens}
    prof = profile_from_prompts(model, corpus.val, source, batch_size=batch_size)
    return save_profile(prof, Path(out_dir))


def trained_on(model_dir: Path) -> str | None:
    """The dataset manifest sha256 a model dir's trustmoe.json says it was trained on."""
    p = Path(model_dir) / "trustmoe.json"
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    v = meta.get("dataset_manifest_sha256") if isinstance(meta, dict) else None
    return v if isinstance(v, str) else None
