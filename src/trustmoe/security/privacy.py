"""Privacy audits of a trained model: canary exposure, extraction and membership inference.

- Exposure (Secret Sharer, Carlini et al. 2019): for a canary `prefix + secret`, with the
  secret drawn from a space R, exposure = log2|R| − log2 rank, where rank is the position of
  the canary's log-perplexity Px = −log p(secret | prefix) among all r ∈ R. When |R| is small
  (≤ `enumerate_limit`) every candidate is scored and the rank is exact. Otherwise (the paper's
  §4.3 extrapolation) `n_candidates` random secrets are scored, a skew-normal is fitted to
  their log-perplexities (method of moments), and exposure = −log2 F(Px(canary)) with F its
  CDF, capped at log2|R|. The directly sampled −log2(share of candidates at or below the
  canary) is reported beside it; it cannot exceed log2(n_candidates).
- Extraction (Carlini et al. 2021/2023): a `prefix_len`-token prefix of a training document
  is continued greedily for `suffix_len` tokens; exact match = the true suffix, near match =
  token edit similarity ≥ 0.75. Held-out documents give the baseline rate (text that any model
  of the language would complete, e.g. boilerplate).
- Membership inference: loss, zlib, Min-K% and Min-K%++ (from `trustmoe.eval.membership`) and
  a reference-model attack, LiRA offline with one reference model and a global variance
  (Carlini et al. 2022): score = mean logit-scaled token confidence under the target minus
  under a reference model trained on held-out data only. Members are training documents,
  non-members held-out documents the reference model did not see.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from trustmoe.data.canaries import Canary, format_secret
from trustmoe.eval.backend_model import score_requests
from trustmoe.eval.loglik import Request
from trustmoe.io import TrustmoeError
from trustmoe.security.privacy_stats import attack_figures, bootstrap, mean_figure

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from trustmoe.engine import Engine
    from trustmoe.eval.loglik import Scored
    from trustmoe.model.transformer import Transformer

BOS = 0


# --------------------------------------------------------------------------------- exposure

def skewnorm_moments(x: np.ndarray) -> tuple[float, float, float]:
    """Skew-normal (shape a, loc, scale) fitted by the method of moments (Azzalini)."""
    m, s = float(np.mean(x)), float(np.std(x))
    if s <= 0:
        return 0.0, m, 1e-12
    g = float(np.mean(((x - m) / s) ** 3))
    g = max(-0.99, min(0.99, g))  # the skew-normal's skewness is bounded by ~0.995
    c = abs(g) ** (2 / 3)
    delta = math.copysign(math.sqrt(math.pi / 2 * c / (c + ((4 - math.pi) / 2) ** (2 / 3))), g)
    delta = max(-0.999, min(0.999, delta))
    scale = s / math.sqrt(1 - 2 * delta**2 / math.pi)
    loc = m - scale * delta * math.sqrt(2 / math.pi)
    return delta / math.sqrt(1 - delta**2), loc, scale


def exposure_from_sample(px_canary: float, px_candidates: np.ndarray, log2_space: float
                         ) -> tuple[float, float]:
    """(extrapolated exposure, sampled exposure) of one canary; both capped at log2|R|."""
    from scipy.stats import skewnorm

    a, loc, scale = skewnorm_moments(px_candidates)
    log_cdf = float(skewnorm.logcdf(px_canary, a, loc, scale))
    extrapolated = min(log2_space, -log_cdf / math.log(2)) if log_cdf > -math.inf else log2_space
    share = max(float(np.mean(px_candidates <= px_canary)), 1.0 / len(px_candidates))
    return max(0.0, extrapolated), min(log2_space, -math.log2(share))


def exact_exposure(px_canary: float, px_all: np.ndarray) -> float:
    """log2|R| − log2 rank, rank = 1 + candidates strictly more likely (+ half the ties)."""
    rank = 1 + float(np.sum(px_all < px_canary)) + 0.5 * max(
        0.0, float(np.sum(px_all == px_canary)) - 1)
    return math.log2(len(px_all)) - math.log2(rank)


def _secret_requests(tok: Tokenizer, prefix: str, secrets: Sequence[str]) -> list[Request]:
    pre = tok.encode(prefix).ids
    reqs = []
    for s in secrets:
        ids = tok.encode(f"{prefix} {s}").ids
        if ids[: len(pre)] != pre or len(ids) == len(pre):
            raise TrustmoeError(f"canary prefix {prefix!r} does not tokenize apart from its "
                                "secret with this tokenizer")
        reqs.append(Request([BOS, *ids], 1 + len(pre)))
    return reqs


def _log_perplexity(model: Transformer, reqs: list[Request], batch_size: int) -> np.ndarray:
    scored = score_requests(model, reqs, batch_size=batch_size)
    return np.array([-float(s.logprobs.sum()) for s in scored])  # (n,) nats


@dataclass
class ExposureOptions:
    n_candidates: int = 2000
    enumerate_limit: int = 20_000
    batch_size: int = 128
    seed: int = 0


def canary_exposure(model: Transformer, tok: Tokenizer, canaries: Sequence[Canary],
                    opts: ExposureOptions | None = None) -> list[dict[str, Any]]:
    """One record per canary: log-perplexity, exposure (exact or extrapolated), and whether
    greedy decoding from the prefix reproduces the secret."""
    opts = opts or ExposureOptions()
    out = []
    for i, c in enumerate(canaries):
        rng = np.random.default_rng([opts.seed, 0xE7, i])
        px_c = float(_log_perplexity(model, _secret_requests(tok, c.prefix, [c.secret]), 1)[0])
        log2_space = c.digits * math.log2(10)
        exact = c.space_size <= opts.enumerate_limit
        if exact:
            cands = [format_secret([int(ch) for ch in f"{j:0{c.digits}d}"])
                     for j in range(c.space_size)]
        else:
            cands = [format_secret(d) for d in rng.integers(0, 10, (opts.n_candidates, c.digits))]
        px = _log_perplexity(model, _secret_requests(tok, c.prefix, cands), opts.batch_size)
        if exact:
            exposure = sampled = exact_exposure(px_c, px)
        else:
            exposure, sampled = exposure_from_sample(px_c, px, log2_space)
        out.append({
            "id": c.id, "repeats": c.repeats, "log2_space": round(log2_space, 4),
            "log_perplexity": round(px_c, 4), "candidates_mean_log_perplexity": round(
                float(px.mean()), 4), "method": "exact" if exact else "skew-normal",
            "exposure": round(exposure, 4), "exposure_sampled": round(sampled, 4),
            "candidates": len(px),
            "extracted": extract_canary(model, tok, c),
        })
    return out


def extract_canary(model: Transformer, tok: Tokenizer, c: Canary) -> bool:
    """Greedy decoding from BOS + prefix reproduces the secret's tokens."""
    req = _secret_requests(tok, c.prefix, [c.secret])[0]
    prefix, want = req.ids[: req.start], req.ids[req.start:]
    got = greedy_continue(model, [prefix], len(want))[0]
    return got == want


def exposure_by_repeats(records: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Mean exposure (and extraction rate) per repeat count, bootstrapped over canaries."""
    out: dict[str, Any] = {}
    for r in sorted({rec["repeats"] for rec in records}):
        grp = [rec for rec in records if rec["repeats"] == r]
        ex = np.array([rec["exposure"] for rec in grp])
        out[str(r)] = {
            "exposure": mean_figure(ex, seed),
            "exposure_sampled": mean_figure(np.array([rec["exposure_sampled"] for rec in grp]),
                                            seed),
            "extracted": mean_figure(np.array([float(rec["extracted"]) for rec in grp]), seed),
            "log2_space": grp[0]["log2_space"], "canaries": len(grp),
        }
    return out


# ------------------------------------------------------------------------------- extraction

_ENGINES: weakref.WeakKeyDictionary[Transformer, Engine] = weakref.WeakKeyDictionary()


def greedy_continue(model: Transformer, prefixes: Sequence[list[int]], n_new: int,
                    batch_size: int = 32) -> list[list[int]]:
    """Greedy continuation of each prefix by exactly n_new tokens, through the serving engine
    (the one generation stack: what is audited is what is served). One engine per model,
    built on first use; `batch_size` is the most sequences decoded at once."""
    if n_new <= 0 or not prefixes:
        return [[] for _ in prefixes]
    from trustmoe.engine import Engine, SamplingParams

    eng = _ENGINES.get(model)
    if eng is None or eng.engine_config.max_num_seqs != batch_size:
        eng = _ENGINES[model] = Engine(model, max_num_seqs=batch_size)
    params = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    return [r.token_ids for r in eng.generate([list(p) for p in prefixes], params=params)]


def edit_similarity(a: Sequence[int], b: Sequence[int]) -> float:
    """1 − Levenshtein(a, b) / max(len): 1.0 for identical token lists."""
    if not a and not b:
        return 1.0
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return 1.0 - prev[-1] / max(len(a), len(b))


def extraction(model: Transformer, train_docs: Sequence[list[int]],
               val_docs: Sequence[list[int]], prefix_len: int = 32, suffix_len: int = 32,
               near: float = 0.75, seed: int = 0) -> dict[str, Any]:
    """Exact and near extraction rates on training documents vs held-out documents."""
    res: dict[str, Any] = {"prefix_tokens": prefix_len, "suffix_tokens": suffix_len,
                           "near_threshold": near}
    sims: dict[str, np.ndarray] = {}
    for name, docs in (("train", train_docs), ("heldout", val_docs)):
        usable = [d for d in docs if len(d) >= prefix_len + suffix_len]
        prefixes = [[BOS, *d[:prefix_len]] for d in usable]
        got = greedy_continue(model, prefixes, suffix_len)
        sims[name] = np.array([edit_similarity(g, d[prefix_len:prefix_len + suffix_len])
                               for g, d in zip(got, usable, strict=True)])
        res[name] = {
            "documents": len(usable),
            "exact_rate": mean_figure((sims[name] == 1.0).astype(float), seed),
            "near_rate": mean_figure((sims[name] >= near).astype(float), seed),
            "mean_similarity": mean_figure(sims[name], seed),
        }
    res["excess_exact_rate"] = bootstrap(
        lambda a, b: float(np.mean(a == 1.0) - np.mean(b == 1.0)) if len(a) and len(b)
        else float("nan"), [sims["train"], sims["heldout"]], seed=seed)
    res["excess_near_rate"] = bootstrap(
        lambda a, b: float(np.mean(a >= near) - np.mean(b >= near)) if len(a) and len(b)
        else float("nan"), [sims["train"], sims["heldout"]], seed=seed)
    return res


# ------------------------------------------------------------------------ membership inference

def logit_confidence(s: Scored) -> float:
    """Mean over tokens of log(p / (1 − p)) of the true token (LiRA's logit scaling)."""
    lp = np.minimum(s.logprobs, -1e-12)
    return float(np.mean(lp - np.log(-np.expm1(lp))))


def membership(members: Sequence[Scored], member_texts: Sequence[str],
               nonmembers: Sequence[Scored], nonmember_texts: Sequence[str],
               ref_members: Sequence[Scored] | None = None,
               ref_nonmembers: Sequence[Scored] | None = None, k: float = 0.2, seed: int = 0
               ) -> dict[str, Any]:
    """Every attack's AUROC and TPR at 0.1% / 1% FPR (bootstrap 95% intervals)."""
    from trustmoe.eval.membership import document_scores

    if not members or not nonmembers:
        raise TrustmoeError("membership inference needs training and held-out documents")
    m = document_scores(members, member_texts, k)
    n = document_scores(nonmembers, nonmember_texts, k)
    if ref_members is not None and ref_nonmembers is not None:
        m["reference"] = np.array([logit_confidence(a) - logit_confidence(b)
                                   for a, b in zip(members, ref_members, strict=True)])
        n["reference"] = np.array([logit_confidence(a) - logit_confidence(b)
                                   for a, b in zip(nonmembers, ref_nonmembers, strict=True)])
    attacks = {a: attack_figures(m[a], n[a], seed) for a in m}
    best = max(attacks, key=lambda a: attacks[a]["auroc"]["value"] or 0.0)
    return {"members": len(members), "nonmembers": len(nonmembers), "min_k": k,
            "attacks": attacks, "best_attack": best}
