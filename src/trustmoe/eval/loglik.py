"""The one primitive every metric is built on: batched per-token log-probabilities.

A *request* is a token sequence and the first position to score: the result holds, for every
scored token `ids[t]`, `log p(ids[t] | ids[:t])` plus the few per-position summaries of the
full next-token distribution that calibration, OOD detection and membership inference need
(entropy, max-probability, max-logit, log-partition, sum of p², variance of log p), so
no caller ever needs the (T, V) logits. Requests are sorted by length and right-padded; with
causal attention padding never changes a real position, so the batch size changes nothing
beyond float noise.

    >>> from trustmoe.eval import loglik
    >>> scores = loglik("runs/demo/model", ["Once upon a time"])   # a model dir or a Transformer
    >>> scores[0].logprobs.sum()                                    # log p(text | BOS)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from trustmoe.eval.moe_diag import RoutingCollector
    from trustmoe.model.transformer import Transformer

BOS_ID = 0  # <|endoftext|> separates documents, so it is also the start-of-document token
STAT_NAMES = ("entropy", "logp_var", "max_prob", "max_logit", "lse", "sum_p2")


@dataclass
class Request:
    ids: list[int]  # full sequence, e.g. [BOS] + context + continuation
    start: int  # first scored position (>= 1): scores ids[start:] given their prefixes


@dataclass
class Scored:
    """Per-token results for one request (or one text, windows joined); n = scored tokens."""

    targets: np.ndarray  # (n,) int64 scored token ids
    logprobs: np.ndarray  # (n,) float64 log p(target | prefix)
    greedy: np.ndarray  # (n,) bool, target is the argmax
    entropy: np.ndarray  # (n,) H(p) in nats
    logp_var: np.ndarray  # (n,) Var_p[log p] under the next-token distribution (Min-K%++)
    max_prob: np.ndarray  # (n,) max_v p_v
    max_logit: np.ndarray  # (n,) max_v logit_v
    lse: np.ndarray  # (n,) logsumexp(logits) (negative energy)
    sum_p2: np.ndarray  # (n,) sum_v p_v^2 (Brier)
    hidden: np.ndarray | None = None  # (d,) mean final hidden state over the predicting positions
    logits: Tensor | None = None  # (n, V) float32, only when asked for

    @property
    def n(self) -> int:
        return int(self.targets.shape[0])

    @property
    def total(self) -> float:
        return float(self.logprobs.sum())

    @property
    def is_greedy(self) -> bool:
        return bool(self.greedy.all())


def resolve_model(model: Transformer | str | Path) -> Transformer:
    if isinstance(model, str | Path):
        from trustmoe.model.hf import load

        return load(model)
    return model


def encode_texts(texts: Sequence[str] | Sequence[Sequence[int]], tokenizer: Tokenizer | None,
                 vocab_size: int) -> list[list[int]]:
    """Strings are tokenized; token lists are checked against the vocabulary."""
    out: list[list[int]] = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            if tokenizer is None:
                raise TrustmoeError("loglik got strings but no tokenizer: pass tokenizer=")
            out.append(tokenizer.encode(t).ids)
        else:
            ids = [int(x) for x in t]  # type: ignore[call-overload]
            if any(x < 0 or x >= vocab_size for x in ids):
                raise TrustmoeError(
                    f"text {i} has token ids outside the vocabulary [0, {vocab_size})"
                )
            out.append(ids)
    return out


def rolling_requests(ids: list[int], max_len: int, stride: int) -> list[Request]:
    """Sliding windows over [BOS] + ids: each token is scored once, with up to max_len - 1 context.

    Window j ends `stride` tokens after window j - 1 and scores only those new tokens (the
    Hugging Face perplexity recipe; stride <= max_len - 1 so every token has context).
    """
    seq = [BOS_ID, *ids]
    n = len(seq)
    if n < 2:
        return []
    reqs = [Request(seq[:max_len], 1)]
    end = min(max_len, n)
    while end < n:
        new_end = min(end + stride, n)
        begin = max(0, new_end - max_len)
        reqs.append(Request(seq[begin:new_end], end - begin))
        end = new_end
    return reqs


def _stats(logits: Tensor, targets: Tensor, temperature: float) -> dict[str, Tensor]:
    # logits: (n, V), targets: (n,) -> dict of (n,) tensors
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    logp = z - lse[:, None]  # (n, V)
    p = logp.exp()
    plogp = p * logp
    mx, arg = z.max(dim=-1)
    neg_ent = plogp.sum(-1)  # (n,) E_p[log p]
    return {
        "logprobs": logp.gather(1, targets[:, None]).squeeze(1),
        "greedy": arg == targets,
        "entropy": -neg_ent,
        "logp_var": (p * (logp - neg_ent[:, None]).square()).sum(-1),
        "max_prob": (mx - lse).exp(),
        "max_logit": mx,
        "lse": lse,
        "sum_p2": (p * p).sum(-1),
    }


@torch.no_grad()
def score_requests(
    model: Transformer,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    return_hidden: bool = False,
    return_logits: bool = False,
    temperature: float = 1.0,
    routing: RoutingCollector | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Scored]:
    """Score requests in length-sorted, right-padded batches; results in request order."""
    if batch_size < 1:
        raise TrustmoeError(f"batch size must be >= 1, got {batch_size}")
    if temperature <= 0:
        raise TrustmoeError(f"temperature must be > 0, got {temperature}")
    max_pos = model.config.max_position_embeddings
    for i, r in enumerate(requests):
        if not 1 <= r.start <= len(r.ids) - 1:
            raise TrustmoeError(f"request {i}: start {r.start} outside 1..{len(r.ids) - 1}")
        if len(r.ids) > max_pos:
            raise TrustmoeError(f"request {i} has {len(r.ids)} tokens; the model takes {max_pos}")
    device = model.device
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].ids), i))
    results: list[Scored | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(order), batch_size):
            idxs = order[b0:b0 + batch_size]
            _score_batch(model, requests, idxs, results, device, return_hidden, return_logits,
                         temperature, routing)
            if on_batch is not None:
                on_batch(len(idxs))
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


def _score_batch(
    model: Transformer, requests: Sequence[Request], idxs: list[int],
    results: list[Scored | None], device: torch.device, return_hidden: bool,
    return_logits: bool, temperature: float, routing: RoutingCollector | None,
) -> None:
    T = max(len(requests[i].ids) for i in idxs)
    B = len(idxs)
    idx = torch.zeros(B, T, dtype=torch.long)  # (B, T) right-padded with BOS
    real = torch.zeros(B, T, dtype=torch.bool)  # (B, T)
    for row, i in enumerate(idxs):
        ids = requests[i].ids
        idx[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        real[row, : len(ids)] = True
    idx, real = idx.to(device), real.to(device)
    if routing is not None:
        routing.set_mask(real.flatten())
    out = model.run(idx, return_hidden=return_hidden)
    if routing is not None:
        routing.set_mask(None)
    # gather every scored position of the batch into one (n_total, V) block
    rows, cols, spans = [], [], []
    for row, i in enumerate(idxs):
        r = requests[i]
        pos = torch.arange(r.start - 1, len(r.ids) - 1)  # positions whose next token is scored
        rows.append(torch.full_like(pos, row))
        cols.append(pos)
        spans.append(pos.numel())
    rr, cc = torch.cat(rows).to(device), torch.cat(cols).to(device)
    logits = out.logits[rr, cc]  # (n_total, V)
    targets = idx[rr, cc + 1]  # (n_total,)
    st = _stats(logits, targets, temperature)
    host = {k: v.cpu().numpy() if k == "greedy" else v.double().cpu().numpy()
            for k, v in st.items()}
    hid = out.hidden_states[rr, cc].double().cpu() if out.hidden_states is not None else None
    tg = targets.cpu().numpy()
    off = 0
    for i, n in zip(idxs, spans, strict=True):
        sl = slice(off, off + n)
        results[i] = Scored(
            targets=tg[sl], logprobs=host["logprobs"][sl], greedy=host["greedy"][sl],
            entropy=host["entropy"][sl], logp_var=host["logp_var"][sl], max_prob=host["max_prob"][sl],
            max_logit=host["max_logit"][sl], lse=host["lse"][sl], sum_p2=host["sum_p2"][sl],
            hidden=hid[sl].mean(0).numpy() if hid is not None and n else None,
            logits=logits[sl].float().cpu() if return_logits else None,
        )
        off += n


def join(parts: Sequence[Scored]) -> Scored:
    """Concatenate the windows of one text (hidden states averaged per token)."""
    if len(parts) == 1:
        return parts[0]
    cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in
           ("targets", "logprobs", "greedy", *STAT_NAMES)}
    hidden = None
    if parts and all(p.hidden is not None for p in parts):
        w = np.array([p.n for p in parts], dtype=np.float64)
        hidden = np.average(np.stack([p.hidden for p in parts]), axis=0, weights=w)  # type: ignore[misc]
    logits = None
    if parts and all(p.logits is not None for p in parts):
        logits = torch.cat([p.logits for p in parts])  # type: ignore[misc]
    return Scored(**cat, hidden=hidden, logits=logits)


def loglik(
    model: Transformer | str | Path,
    texts: Sequence[str] | Sequence[Sequence[int]],
    tokenizer: Tokenizer | str | Path | None = None,
    *,
    batch_size: int = 8,
    max_len: int | None = None,
    stride: int | None = None,
    return_hidden: bool = False,
    return_logits: bool = False,
    temperature: float = 1.0,
    routing: RoutingCollector | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Scored]:
    """Per-token log-probabilities of each whole text given a BOS token.

    `texts` are strings (tokenized with `tokenizer`, or the model dir's tokenizer.json when
    `model` is a path) or token-id lists. Texts longer than `max_len` (default: the model's
    context) are scored with sliding windows of `max_len` tokens advancing by `stride`
    (default max_len // 2), so every token is scored exactly once.
    """
    from trustmoe.data.tokenizer import load_tokenizer

    wants_tok = any(isinstance(t, str) for t in texts)
    if tokenizer is None and isinstance(model, str | Path) and wants_tok:
        tokenizer = load_tokenizer(model)
    if isinstance(tokenizer, str | Path):
        tokenizer = load_tokenizer(tokenizer)
    m = resolve_model(model)
    L = min(max_len or m.config.max_position_embeddings, m.config.max_position_embeddings)
    if L < 2:
        raise TrustmoeError(f"max_len must be at least 2, got {L}")
    S = stride or max(1, L // 2)
    if not 1 <= S <= L - 1:
        raise TrustmoeError(f"stride must be in 1..{L - 1} (max_len - 1), got {S}")
    seqs = encode_texts(texts, tokenizer, m.config.vocab_size)
    reqs: list[Request] = []
    owner: list[int] = []
    for i, ids in enumerate(seqs):
        if not ids:
            raise TrustmoeError(f"text {i} is empty: nothing to score")
        for r in rolling_requests(ids, L, S):
            reqs.append(r)
            owner.append(i)
    scored = score_requests(m, reqs, batch_size=batch_size, return_hidden=return_hidden,
                            return_logits=return_logits, temperature=temperature,
                            routing=routing, on_batch=on_batch)
    grouped: list[list[Scored]] = [[] for _ in seqs]
    for o, s in zip(owner, scored, strict=True):
        grouped[o].append(s)
    return [join(g) for g in grouped]


def continuation_requests(pairs: Sequence[tuple[list[int], list[int]]], max_len: int
                          ) -> list[Request]:
    """lm-eval's loglikelihood requests: score `cont` after [BOS] + `ctx`.

    Too-long contexts lose tokens from the left; unlike lm-eval, BOS is kept, since every
    training document started after one.
    """
    reqs = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise TrustmoeError(f"request {i} has an empty continuation")
        if len(cont) + 2 > max_len:
            raise TrustmoeError(f"request {i}: continuation of {len(cont)} tokens exceeds context")
        keep = max_len - 1 - len(cont)
        seq = [BOS_ID, *(ctx[-keep:] if len(ctx) > keep else ctx), *cont]
        reqs.append(Request(seq, len(seq) - len(cont)))
    return reqs


def summarize(scored: Sequence[Scored]) -> dict[str, Any]:
    n = sum(s.n for s in scored)
    nll = -sum(s.total for s in scored)
    return {"tokens": n, "nll": nll / max(n, 1)}
