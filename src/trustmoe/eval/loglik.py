"""The primitive every metric is built on: per-token log-probabilities with distribution summaries.

A *request* is a token sequence and the first position to score: the result (`Scored`) holds,
for every scored token `ids[t]`, `log p(ids[t] | ids[:t])` plus the few per-position summaries
of the full next-token distribution that calibration, OOD detection and membership inference
need (entropy, max-probability, max-logit, log-partition, sum of p², variance of log p), so no
caller ever needs the (T, V) logits. Which backend computes them (the torch model, the engine,
an OpenAI-compatible server) is hidden behind `trustmoe.eval.lm.LM`; this module holds what
they share: request building (BOS from the model, never a constant), the summary maths, and
`loglik`, the one-call convenience.

    >>> from trustmoe.eval import loglik
    >>> scores = loglik("runs/demo/model", ["Once upon a time"])   # a model dir, model or LM
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

    from trustmoe.eval.lm import LM
    from trustmoe.eval.moe_diag import RoutingCollector
    from trustmoe.model.transformer import Transformer

STAT_NAMES = ("entropy", "logp_var", "max_prob", "max_logit", "lse", "sum_p2")


@dataclass
class Request:
    ids: list[int]  # full sequence, e.g. [BOS] + context + continuation
    start: int  # first scored position (>= 1): scores ids[start:] given their prefixes


@dataclass
class Scored:
    """Per-token results for one request (or one text, windows joined); n = scored tokens.

    On a backend that sees only top-k log-probabilities (an OpenAI-compatible server) the
    distribution summaries are estimates and `max_logit`/`lse` are NaN (log-probabilities do
    not fix the logits' scale); `targets`, `logprobs` and `greedy` are always exact.
    """

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


def stats(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> dict[str, Tensor]:
    """logits (n, V), targets (n,) -> the per-position fields of `Scored` as (n,) tensors."""
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


def to_host(st: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """`stats` output as numpy: greedy stays bool, everything else float64."""
    return {k: v.cpu().numpy() if k == "greedy" else v.double().cpu().numpy()
            for k, v in st.items()}


def scored_slice(host: dict[str, np.ndarray], targets: np.ndarray, sl: slice, *,
                 hidden: np.ndarray | None = None, logits: Tensor | None = None) -> Scored:
    """One request's `Scored` from a block of host stats (rows `sl`)."""
    return Scored(targets=targets[sl], logprobs=host["logprobs"][sl], greedy=host["greedy"][sl],
                  **{k: host[k][sl] for k in STAT_NAMES}, hidden=hidden, logits=logits)


def check_requests(requests: Sequence[Request], max_len: int) -> None:
    for i, r in enumerate(requests):
        if not 1 <= r.start <= len(r.ids) - 1:
            raise TrustmoeError(f"request {i}: start {r.start} outside 1..{len(r.ids) - 1}")
        if len(r.ids) > max_len:
            raise TrustmoeError(f"request {i} has {len(r.ids)} tokens; the model takes {max_len}")


def encode_texts(texts: Sequence[str] | Sequence[Sequence[int]], encode: Callable[[str], list[int]]
                 | None, vocab_size: int) -> list[list[int]]:
    """Strings are encoded (without BOS: requests add it); token lists are range-checked."""
    out: list[list[int]] = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            if encode is None:
                raise TrustmoeError("loglik got strings but no tokenizer: pass tokenizer=")
            out.append(encode(t))
        else:
            ids = [int(x) for x in t]  # type: ignore[call-overload]
            if any(x < 0 or x >= vocab_size for x in ids):
                raise TrustmoeError(
                    f"text {i} has token ids outside the vocabulary [0, {vocab_size})"
                )
            out.append(ids)
    return out


def rolling_requests(ids: list[int], max_len: int, stride: int, prefix: int) -> list[Request]:
    """Sliding windows over [prefix] + ids: each token is scored once, with up to max_len - 1
    tokens of context (`prefix` is the model's BOS, `TextCodec.prefix_id`).

    Window j ends `stride` tokens after window j - 1 and scores only those new tokens (the
    Hugging Face perplexity recipe; stride <= max_len - 1 so every token has context).
    """
    seq = [prefix, *ids]
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


def continuation_requests(pairs: Sequence[tuple[list[int], list[int]]], max_len: int,
                          prefix: int) -> list[Request]:
    """lm-eval's loglikelihood requests: score `cont` after [prefix] + `ctx`.

    Too-long contexts lose tokens from the left; unlike lm-eval, the prefix (BOS) is kept,
    since every training document started after one.
    """
    reqs = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise TrustmoeError(f"request {i} has an empty continuation")
        if len(cont) + 2 > max_len:
            raise TrustmoeError(f"request {i}: continuation of {len(cont)} tokens exceeds context")
        keep = max_len - 1 - len(cont)
        seq = [prefix, *(ctx[-keep:] if len(ctx) > keep else ctx), *cont]
        reqs.append(Request(seq, len(seq) - len(cont)))
    return reqs


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
    model: LM | Transformer | str | Path,
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
    """Per-token log-probabilities of each whole text given the model's BOS.

    `model` is an `LM` (any backend), a `Transformer` or a model dir (both: the torch
    backend). `texts` are strings (encoded with the LM's `TextCodec`; `tokenizer` overrides
    the model dir's) or token-id lists. Texts longer than `max_len` (default: the model's
    context) are scored with sliding windows of `max_len` tokens advancing by `stride`
    (default max_len // 2), so every token is scored exactly once.
    """
    from trustmoe.eval.lm import LM

    if isinstance(model, LM):
        lm = model
        if temperature != 1.0:
            raise TrustmoeError("temperature applies to the torch backend only")
    else:
        from trustmoe.eval.backend_model import ModelLM

        lm = ModelLM.create(model, tokenizer=tokenizer, batch_size=batch_size,
                            temperature=temperature)
    encode = None if lm.codec is None else (lambda t: lm.codec.encode(t, add_bos=False))  # type: ignore[union-attr]
    seqs = encode_texts(texts, encode, lm.vocab_size)
    return lm.loglikelihood_rolling(seqs, max_len=max_len, stride=stride, hidden=return_hidden,
                                    logits=return_logits, routing=routing, on_batch=on_batch)


def summarize(scored: Sequence[Scored]) -> dict[str, Any]:
    n = sum(s.n for s in scored)
    nll = -sum(s.total for s in scored)
    return {"tokens": n, "nll": nll / max(n, 1)}
