"""Model-level backdoor screening of a generative MoE LM over its training documents.

A trigger → payload backdoor makes the model continue a rare trigger with a fixed payload.
Four detectors score every training chunk (higher = more suspicious):

- `spectral` (Tran et al. 2018): chunk representation = mean final hidden state; centre,
  take the top right-singular vector, score = squared projection.
- `activation_clustering` (Chen et al. 2018): representation = [mean hidden state, per-layer
  expert load of the chunk's tokens]; PCA to ≤ 10 dims, 2-means; a cluster holding less than
  35% of the chunks is suspicious; score = distance to the large cluster's centre for chunks
  in the small one, 0 otherwise.
- `expert_spectral`: spectral signatures per expert (the MoE analogue of per-class): for each
  layer and expert, the tokens routed to it, centred within that expert; a token's score is
  its squared projection on the expert's top direction over the expert's median; a chunk's
  score is the mean of its 4 highest token scores (triggers are a few tokens, not a chunk).
- `trigger_search` (`backdoor_trigger`): spans that recur across chunks with one fixed
  continuation, scored by how much of that continuation the span alone explains in a neutral
  context (Δ NLL, nats): a trigger → payload backdoor is context-independent, memorised text
  is not (deleting spans in place, ONION's test, fails on a model that memorised its
  training text: every deletion raises the NLL of what follows).

Calibration. The representation detectors (the first three) are cross-fitted: the training
chunks are split in two halves, each scored by the parts (mean and direction,
standardisation, PCA and clusters, per-expert directions) fitted on the other half, and
each half is its own null (leave-one-out p-values over its scores). Fitted in sample, a top
direction is fitted to the very chunks it scores; and held-out chunks are no null for them:
the model has memorised its training chunks (train loss ~0.9 vs held-out ~4.5 on the
benchmark) and their hidden states differ by membership alone (calibrated on held-out
chunks, 0.3-3.8% of a clean model's documents were flagged at a 1% target). Out of fold,
clean training chunks are exchangeable with each other, so about `fpr` of them are flagged
whatever the model, as the spectral-signature paper removes a fixed top share.
The trigger search scores candidates in a neutral context, the same for training and null
chunks, so it is calibrated on `null_chunks`, held-out documents the model never trained on
(the scan passes the dataset's validation chunks): a chunk's p-value is conformal,
p = (1 + #{null scores ≥ its score}) / (m + 1), and it is flagged when p ≤ `fpr`. For clean
chunks exchangeable with the null this keeps the false-positive rate ≤ `fpr` (a robust
z-score threshold flagged ~17% of clean chunks, the scores being heavy-tailed). Poisoned
held-out chunks in the null only raise the threshold (fewer flags, never more). The null
needs m + 1 ≥ 1/`fpr` chunks to flag anything; without `null_chunks`, the training chunks
serve as their own null (leave-one-out).

Classifier-era detectors (the first three) assume poison is a sizeable share of a class; in a
language model it is a few tokens of a few documents, so expect them to be weak here; the
benchmark (`benchmarks/backdoor.py`) reports each one's precision, recall and false-positive
rate on a clean twin model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from trustmoe.security.backdoor_trigger import neutral_contexts, trigger_search

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from trustmoe.model.transformer import Transformer

DETECTORS = ("spectral", "activation_clustering", "expert_spectral", "trigger_search")


@dataclass
class BackdoorOptions:
    fpr: float = 0.01  # target false-positive rate of each detector on clean chunks
    candidates: int = 16  # most surprising tokens per chunk that start candidate spans
    span: int = 8  # most continuation tokens scored after a candidate trigger
    max_ablate: int = 12  # candidate trigger lengths 1..max_ablate tokens (a made-up word is 4-8)
    match: int = 4  # continuation tokens that must recur after the span
    min_chunks: int = 3  # chunks holding span + continuation
    min_consistency: float = 0.95  # share of the span's complete occurrences followed by it: a
    # planted trigger always is (0.5 let `*args,` -> ` **kwargs` (7 of 8) outrank the plant)
    max_overlap: float = 0.02  # holders sharing this much besides the span: one family, not
    # a plant (token 4-gram Jaccard; random sets of 4 chunks: 99th percentile 0.010)
    batch_size: int = 32


@dataclass
class ChunkFeatures:
    hidden: np.ndarray  # (n, d) mean final hidden state per chunk
    load: np.ndarray  # (n, L*E) expert load fractions per MoE layer
    token_hidden: list[np.ndarray]  # per MoE layer: (tokens, d) inputs to the MoE
    token_expert: list[np.ndarray]  # per MoE layer: (tokens,) top-1 expert
    token_chunk: np.ndarray  # (tokens,) chunk index of each token
    logprobs: list[np.ndarray]  # per chunk (n_i,) log p of tokens 1.. given BOS + prefix


@torch.no_grad()
def chunk_features(model: Transformer, chunks: Sequence[list[int]], batch_size: int = 16
                   ) -> ChunkFeatures:
    """One forward pass per batch: hidden states, routing and token log-probabilities."""
    from trustmoe.model.moe import MoE

    moes = [b.mlp for b in model.layers if isinstance(b.mlp, MoE)]
    E = moes[0].num_experts if moes else 0
    grabbed: list[tuple[Tensor, Tensor]] = []

    def hook(mod: Any, args: Any, out: Any) -> None:
        grabbed.append((args[0].reshape(-1, args[0].shape[-1]), out[1].experts[:, 0]))

    handles = [m.register_forward_hook(hook) for m in moes]
    was = model.training
    model.eval()
    hid, load, lps = [], [], []
    tok_h: list[list[np.ndarray]] = [[] for _ in moes]
    tok_e: list[list[np.ndarray]] = [[] for _ in moes]
    tok_c: list[np.ndarray] = []
    try:
        for b0 in range(0, len(chunks), batch_size):
            batch = chunks[b0:b0 + batch_size]
            T = max(len(c) for c in batch) + 1
            idx = torch.zeros(len(batch), T, dtype=torch.long)  # (B, T) BOS + chunk, 0-padded
            for r, c in enumerate(batch):
                idx[r, 1:len(c) + 1] = torch.tensor(c)
            grabbed.clear()
            out = model.run(idx.to(model.device), return_hidden=True)
            logp = out.logits.float().log_softmax(-1)  # (B, T, V)
            assert out.hidden_states is not None
            for r, c in enumerate(batch):
                n = len(c) + 1
                h = out.hidden_states[r, :n].double()  # (n, d)
                hid.append(h.mean(0).cpu().numpy())
                tgt = idx[r, 1:n].to(logp.device)
                lps.append(logp[r, : n - 1].gather(1, tgt[:, None]).squeeze(1).double().cpu().numpy())
                rows = []
                for li, (x, ex) in enumerate(grabbed):
                    xr = x.view(len(batch), T, -1)[r, :n]  # (n, d)
                    er = ex.view(len(batch), T)[r, :n]  # (n,)
                    rows.append(np.bincount(er.cpu().numpy(), minlength=E) / n)
                    tok_h[li].append(xr.double().cpu().numpy())
                    tok_e[li].append(er.cpu().numpy())
                load.append(np.concatenate(rows) if rows else np.zeros(0))
                tok_c.append(np.full(n, b0 + r))
    finally:
        for hd in handles:
            hd.remove()
        model.train(was)
    return ChunkFeatures(np.stack(hid), np.stack(load), [np.concatenate(x) for x in tok_h],
                         [np.concatenate(x) for x in tok_e], np.concatenate(tok_c), lps)


def robust_z(s: np.ndarray) -> np.ndarray:
    med = float(np.median(s))
    mad = float(np.median(np.abs(s - med))) * 1.4826
    if mad <= 0:  # over half the scores tie (e.g. zeros): mean absolute deviation instead
        mad = float(np.mean(np.abs(s - med))) * 1.2533
    return (s - med) / (mad if mad > 0 else 1.0)


def spectral_scores(X: np.ndarray, n_fit: int | None = None) -> np.ndarray:
    """Squared projection of every row on the top right-singular vector of the first `n_fit`
    rows (all by default), centred on their mean. X: (n, d) -> (n,)."""
    n_fit = len(X) if n_fit is None else n_fit
    if n_fit < 2:
        return np.zeros(len(X))
    mu = X[:n_fit].mean(0, keepdims=True)  # (1, d)
    _, _, vt = np.linalg.svd(X[:n_fit] - mu, full_matrices=False)
    return np.asarray(((X - mu) @ vt[0]) ** 2)


def activation_clustering(X: np.ndarray, seed: int = 0, small: float = 0.35,
                          n_fit: int | None = None) -> np.ndarray:
    """(n,) distance to the large cluster's centre for rows assigned to a small 2-means
    cluster, 0 for the others; standardisation, PCA and clusters fitted on the first `n_fit`
    rows (all by default)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    n_fit = len(X) if n_fit is None else n_fit
    if n_fit < 4:
        return np.zeros(len(X))
    F = X[:n_fit]
    Xs = (X - F.mean(0)) / (F.std(0) + 1e-9)  # (n, d)
    pca = PCA(n_components=min(10, *F.shape), random_state=seed).fit(Xs[:n_fit])
    Z = pca.transform(Xs)  # (n, ≤10)
    km = KMeans(2, n_init=10, random_state=seed).fit(Z[:n_fit])
    sizes = np.bincount(km.labels_, minlength=2)
    minor = int(np.argmin(sizes))
    if sizes[minor] / n_fit >= small:
        return np.zeros(len(X))
    labels = km.predict(Z)
    dist = np.linalg.norm(Z - km.cluster_centers_[1 - minor], axis=1)
    return np.where(labels == minor, dist, 0.0)


def expert_spectral(f: ChunkFeatures, n_chunks: int, top: int = 4,
                    n_fit: int | None = None) -> np.ndarray:
    """(n_chunks,) mean of each chunk's `top` highest per-expert spectral token scores; each
    expert's direction and median fitted on the tokens of the first `n_fit` chunks."""
    n_fit = n_chunks if n_fit is None else n_fit
    tok_score = np.zeros(len(f.token_chunk))
    for H, ex in zip(f.token_hidden, f.token_expert, strict=True):
        for e in np.unique(ex):
            sel = np.flatnonzero(ex == e)
            fit = f.token_chunk[sel] < n_fit
            if fit.sum() < 8:
                continue
            order = np.argsort(~fit, kind="stable")  # fitted tokens first
            s = np.empty(len(sel))
            s[order] = spectral_scores(H[sel[order]], int(fit.sum()))
            s = s / (np.median(s[fit]) + 1e-12)
            tok_score[sel] = np.maximum(tok_score[sel], s)
    out = np.zeros(n_chunks)
    for c in range(n_chunks):
        s = np.sort(tok_score[f.token_chunk == c])[::-1][:top]
        out[c] = float(s.mean()) if len(s) else 0.0
    return out


def conformal_p(scores: np.ndarray, null: np.ndarray) -> np.ndarray:
    """(n,) p-value of each score against a null sample: (1 + #{null ≥ s}) / (m + 1).
    For a score exchangeable with the null, P(p ≤ α) ≤ α."""
    srt = np.sort(np.asarray(null, dtype=np.float64))
    ge = len(srt) - np.searchsorted(srt, scores, side="left")
    return np.asarray((1.0 + ge) / (len(srt) + 1.0))


def _to_beat(null: np.ndarray, fpr: float) -> float | None:
    """The score a chunk must exceed to be flagged against `null` at `fpr`: p ≤ fpr holds when
    at most k = ⌊fpr (m + 1)⌋ − 1 null scores are ≥ it, i.e. above the (k + 1)-th highest (None
    when the null is too small to flag anything). How far the flagged chunks clear it is the
    margin a report can show."""
    k = int(np.floor(fpr * (len(null) + 1) - 1 + 1e-9))
    if not 0 <= k < len(null):
        return None
    return round(float(np.sort(null)[::-1][k]), 4)


def self_p(scores: np.ndarray) -> np.ndarray:
    """(n,) leave-one-out p-values of scores against the others: (1 + #{others ≥ s}) / n."""
    srt = np.sort(scores)
    ge = len(srt) - np.searchsorted(srt, scores, side="left")  # includes the score itself
    return np.asarray(ge / max(len(srt), 1))


def _classic(f: ChunkFeatures, order: np.ndarray, n_fit: int, seed: int) -> dict[str, np.ndarray]:
    """The three representation detectors over the chunks in `order` (indices into `f`),
    fitted on the first `n_fit` of them; scores in `order`'s order."""
    import dataclasses

    inv = np.full(len(f.hidden), -1, dtype=np.int64)
    inv[order] = np.arange(len(order))
    rep = np.concatenate([f.hidden, f.load], 1) if f.load.size else f.hidden
    keep = inv[f.token_chunk] >= 0  # (tokens,) tokens of the chunks in `order`
    g = dataclasses.replace(f, token_chunk=inv[f.token_chunk][keep],
                            token_hidden=[h[keep] for h in f.token_hidden],
                            token_expert=[e[keep] for e in f.token_expert])
    return {"spectral": spectral_scores(f.hidden[order], n_fit),
            "activation_clustering": activation_clustering(rep[order], seed, n_fit=n_fit),
            "expert_spectral": expert_spectral(g, len(order), n_fit=n_fit) if f.token_hidden
            else np.zeros(len(order))}


def _cross_fitted(f: ChunkFeatures, n: int, seed: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Two folds of the n scored chunks: each fold scored by the detectors fitted on the
    other, and calibrated on its own scores (`self_p`). Fitted in sample, a direction or a
    cluster is fitted to the chunks it then scores, so they would not be exchangeable with
    any null; and held-out chunks are not a null for training ones either: the model
    memorised the latter, and their hidden states differ by membership alone (calibrated on
    held-out chunks, a clean model had 0.3-3.8% of its documents flagged at a 1% target).
    Out of fold, clean training chunks are exchangeable with each other."""
    perm = np.random.default_rng([seed, 11]).permutation(n)
    folds = (perm[: n // 2], perm[n // 2:])
    scores = {k: np.zeros(n) for k in DETECTORS[:3]}
    pvals = {k: np.ones(n) for k in DETECTORS[:3]}
    for a, b in ((folds[0], folds[1]), (folds[1], folds[0])):
        out = _classic(f, np.concatenate([a, b]), len(a), seed)
        for k, v in out.items():
            scores[k][b] = v[len(a):]
            pvals[k][b] = self_p(v[len(a):])
    return scores, pvals


def screen(model: Transformer, chunks: Sequence[list[int]], tok: Tokenizer,
           opts: BackdoorOptions | None = None, seed: int = 0,
           null_chunks: Sequence[list[int]] = ()) -> dict[str, Any]:
    """Every detector's scores, p-values and flags over `chunks` (token lists of training
    text); the trigger search calibrated on `null_chunks` (held-out text the model did not
    train on) when given, the others out of fold (see the module's docstring).

    Returns {"scores", "p", "flags": {detector: (n,) array}, "evidence": per-chunk dicts,
    "null": {"chunks": m, "fpr": target, "source": "held-out" | "self", "min_p": ...,
    "representation_detectors": how the first three were calibrated}}."""
    opts = opts or BackdoorOptions()
    if not 0.0 < opts.fpr < 1.0:
        raise ValueError(f"fpr must be in (0, 1), got {opts.fpr}")
    n, m = len(chunks), len(null_chunks)
    both = [*chunks, *null_chunks]
    f = chunk_features(model, both, opts.batch_size)
    scores: dict[str, np.ndarray] = {}
    pvals: dict[str, np.ndarray] = {}
    ctxs = neutral_contexts(null_chunks, tok, model.config.vocab_size)
    trig, evidence = trigger_search(model, both, f.logprobs, tok, opts, ctxs)
    if n >= 8:  # cross-fitted: every scored chunk is out of sample
        scores, pvals = _cross_fitted(f, n, seed)
    else:
        full = _classic(f, np.arange(n + m), n, seed)
        scores = {k: v[:n] for k, v in full.items()}
        pvals = {k: conformal_p(v[:n], v[n:]) for k, v in full.items()}
    scores["trigger_search"] = trig[:n]
    pvals["trigger_search"] = conformal_p(trig[:n], trig[n:])
    if not m:
        pvals = {k: np.where(v > 0, self_p(v), 1.0) for k, v in scores.items()}
    flags = {k: p <= opts.fpr for k, p in pvals.items()}
    null = {"chunks": m, "fpr": opts.fpr, "source": "held-out" if m else "self",
            "min_p": round(1.0 / (m + 1), 6) if m else round(1.0 / max(n, 1), 6),
            "representation_detectors": "out of fold" if n >= 8 else "same as trigger_search",
            "trigger_search_to_beat": _to_beat(trig[n:], opts.fpr)}
    return {"scores": scores, "p": pvals, "flags": flags, "evidence": evidence[:n], "null": null}
