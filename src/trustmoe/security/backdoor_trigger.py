"""Trigger search for generative LMs: find spans that, wherever they occur, make the model emit
one fixed continuation (a trigger → payload backdoor), and score the chunks that hold them.

Why not delete spans in place (ONION's test, turned generative): a model that has seen its
training text dozens of times predicts every token of it from the exact context, so deleting
any span raises the NLL of what follows by several nats per token, in clean chunks as much as
at a trigger (measured: Δ 7-12 nats/token everywhere on the benchmark's backdoored model). A
backdoor's signature is instead *context independence*: the trigger forces the payload in
any context (that is what the attack success rate measures). So:

1. Candidates (one forward pass, given): in each chunk, the `candidates` most surprising
   tokens (highest NLL in place: a trigger is inserted where nothing predicts it) start spans
   of 1..`max_ablate` tokens; a span and the `match` tokens after it form a candidate. Spans
   and continuations start at a word boundary (a token that begins with whitespace), so a word
   split in two ("Char" → "acter") is never a candidate.
2. Recurrence (token ids, over the scored and the null chunks together): k = chunks holding
   span + match tokens, m = chunks holding the span. Kept when k ≥ `min_chunks` and k/m ≥
   `min_consistency` (a trigger is followed by its payload wherever it occurs; a common word
   is not); the continuation is extended, up to `span` tokens, for as long as every one of
   the k occurrences agrees.
   Chunks of one family (file headers, generated tables) are not unrelated insertions: the
   median pairwise Jaccard similarity of the holding chunks' token 4-grams outside the
   candidate (`context_overlap`) scales the score by max(0, 1 − overlap / `max_overlap`);
   a line that holds the candidate and recurs verbatim is the candidate's too (a plant's
   line, where the span is only part of it), while a family's table lines differ around it.
   Nor is a line whose words its host uses elsewhere: `def transform(self, node, results):`
   recurs, always followed by the same tokens, across the lib2to3 fixers, which share little
   else, but the code after it uses `node` and `results`; an inserted line is foreign to every
   host. `cohesion` (the share of holders that reuse a word of the candidate's line) scales
   the score by 1 − cohesion.
3. Transplant test, in neutral contexts (the starts of a few held-out chunks, cut after a
   line break: text the model never trained on, the same for every candidate), so
   memorisation of a chunk's own text does not enter and a candidate scores the same
   whichever chunk holds it (train or null): the *forced* continuation is its prefix that
   greedy decoding emits after context + span (the payload, as the attack success rate
   counts it); Δ = Σ over the forced tokens of log p(token | context + span + ...) −
   log p(token | context + ...) (nats), averaged over the contexts: how much of the payload
   the span alone makes the model emit. (BOS alone as the context missed a trigger the model
   emits after a line break: documents do not start with it.)

A chunk's score is the largest scaled Δ of the kept candidates it holds (0 when none); its
evidence, that candidate. Idioms that pass all of this (`*args,` → ` **kwargs`) are as
frequent in held-out text, so the conformal null absorbs them; on the benchmark the rule
"always followed by it" (`min_consistency` 0.95) and cohesion are what rank the plant above
them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from trustmoe.eval.backend_model import score_requests
from trustmoe.eval.loglik import Request

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from trustmoe.model.transformer import Transformer
    from trustmoe.security.backdoor import BackdoorOptions

BOS = 0
WORD = re.compile(r"[A-Za-z_][A-Za-z_0-9]{2,}")  # identifiers and words of 3+ characters
Cand = tuple[tuple[int, ...], tuple[int, ...]]  # (span, the `match` tokens after it)


def word_starts(tok: Tokenizer, vocab: int) -> np.ndarray:
    """(vocab,) True for tokens whose text begins with whitespace (a word boundary)."""
    out = np.zeros(vocab, dtype=bool)
    for t in range(vocab):
        s = tok.decode([t])
        out[t] = bool(s) and s[0].isspace()
    return out


def candidates(chunks: Sequence[list[int]], logprobs: Sequence[np.ndarray], starts: np.ndarray,
               opts: BackdoorOptions) -> set[Cand]:
    """(span, next `match` tokens) pairs starting at each chunk's most surprising tokens."""
    out = set()
    P = opts.match
    for ids, lp in zip(chunks, logprobs, strict=True):
        n = len(ids)
        if n < P + 2:
            continue
        nll = -np.asarray(lp)[: n - P - 1]  # nll[j]: NLL of ids[j] given BOS + ids[:j]
        for a in np.argsort(-nll, kind="stable")[: opts.candidates].tolist():
            if not starts[ids[a]]:
                continue
            for r in range(1, opts.max_ablate + 1):
                if a + r + P <= n and starts[ids[a + r]]:
                    out.add((tuple(ids[a:a + r]), tuple(ids[a + r:a + r + P])))
    return out


def recurrences(chunks: Sequence[list[int]], cands: set[Cand], starts: np.ndarray, match: int
                ) -> tuple[dict[tuple[int, ...], set[int]], dict[Cand, dict[int, int]]]:
    """One pass over every chunk: for each candidate span, the chunks holding it with room
    for `match` tokens after it (one cut off by the chunk's end says nothing about what
    follows it); for each candidate, {chunk: first position} where span + its tokens occur."""
    follow: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    for span, pre in cands:
        follow.setdefault(span, set()).add(pre)
    lengths = sorted({len(sp) for sp in follow})
    holding: dict[tuple[int, ...], set[int]] = {sp: set() for sp in follow}
    occs: dict[Cand, dict[int, int]] = {c: {} for c in cands}
    for c, ids in enumerate(chunks):
        n = len(ids)
        for a in range(n):
            if not starts[ids[a]]:
                continue
            for r in lengths:
                if a + r + match > n:
                    break
                sp = tuple(ids[a:a + r])
                if sp in follow:
                    holding[sp].add(c)
                    pre = tuple(ids[a + r:a + r + match])
                    if pre in follow[sp]:
                        occs[(sp, pre)].setdefault(c, a)
    return holding, occs


def context_overlap(texts: Sequence[str], encs: Sequence[Any], holders: list[int], trigger: str,
                    window: str, most: int = 12) -> float:
    """Median pairwise Jaccard similarity of the token 4-gram sets of the chunks holding a
    candidate (its first `most` holders), the candidate left out: ~0 for insertions into
    unrelated text, high for one family of files sharing a header. The median, as two chunks
    of one poisoned document share its text. Left out: every occurrence of `window` (span and
    continuation), and every line holding the trigger that recurs verbatim in half the
    holders or more: a plant's line (with the `# ` before the span and the `_rsa` after it, and
    a second copy, tokenized differently at a line's start) is the same line in every host,
    where the lines of a family's table that hold a candidate differ around it (their shared
    neighbours mark the family). texts: the chunks decoded; encs: their encodings (token ids
    with character offsets) by the tokenizer; trigger, window: as for `cohesion`."""
    pat = _whole(trigger)
    hold = holders[:most]
    lines = {c: texts[c].split("\n") for c in hold}
    seen = Counter(ln for c in hold for ln in {x.strip() for x in lines[c] if pat.search(x)})
    same = {ln for ln, k in seen.items() if 2 * k >= len(hold)}
    sets = []
    for c in hold:
        cut, at = [], 0
        for ln in lines[c]:
            if ln.strip() in same:
                cut.append((at, at + len(ln)))
            at += len(ln) + 1
        cut += [(m.start(), m.start() + len(window))
                for m in re.finditer(re.escape(window), texts[c])]
        keep = [not any(a < e and s < b for a, b in cut) for s, e in encs[c].offsets]
        ids = encs[c].ids
        sets.append({tuple(ids[i:i + 4]) for i in range(len(ids) - 3) if all(keep[i:i + 4])})
    sims = [len(a & b) / max(len(a | b), 1) for i, a in enumerate(sets) for b in sets[i + 1:]]
    return float(np.median(sims)) if sims else 0.0


def _whole(trigger: str) -> re.Pattern[str]:
    """`trigger` as whole words: `t7` is not in `t75`."""
    return re.compile(rf"(?<!\w){re.escape(trigger)}(?!\w)")


def _cut_lines(text: str, trigger: str, window: str, most: int = 40
               ) -> tuple[str, str, int]:
    """(every occurrence of `trigger` in text, with the rest of `window` (trigger and
    continuation) where it follows, on to its line's end when that is within `most` more
    characters; the rest of the text; how many characters follow the last cut). On text, not
    tokens: a copy at a line's start is tokenized differently from one after indentation."""
    cut, rest, j = [], [], 0
    pat = _whole(trigger)
    while (m := pat.search(text, j)) is not None:
        i = m.start()
        r = i + len(window if text.startswith(window, i) else trigger)
        e = text.find("\n", r, r + most)
        e = min(len(text), r) if e < 0 else e
        rest.append(text[j:i])
        cut.append(text[i:e])
        j = e
    rest.append(text[j:])
    return "\n".join(cut), "\n".join(rest), len(text) - j


def cohesion(texts: Sequence[str], holders: list[int], trigger: str, window: str,
             common: set[str], after: int = 48) -> float:
    """Share of the holding chunks that use, elsewhere, one of the words of the candidate's
    line (trigger and continuation to the line's end, `common` words left out): an idiom's
    words are its host's (`def transform(self, node, results):` is followed by code that uses
    `node` or `results`); a line inserted into unrelated documents shares none with them.
    Holders with fewer than `after` characters after the line, or whose line has no uncommon
    word, abstain; 0 when all do. texts: the chunks decoded; trigger, window: the candidate's
    span, and span + continuation, decoded and stripped."""
    used = []
    for c in holders:
        line, rest, tail = _cut_lines(texts[c], trigger, window)
        words = set(WORD.findall(line)) - common
        # the rest's first and last lines are cut by the chunk's edges: a fragment of another
        # occurrence (`4 cat ~/.ssh/id_rsa`) would count as reuse
        inner = rest.split("\n")[1:-1]
        if words and tail >= after:
            used.append(bool(words & set(WORD.findall("\n".join(inner)))))
    return float(np.mean(used)) if used else 0.0


def _holds(text: str, trigger: str, cont: str) -> bool:
    """Whether text holds `trigger` (whole words) followed by `cont`, or by as much of it as
    the text has left."""
    for m in _whole(trigger).finditer(text):
        after = text[m.end():].lstrip()
        if after.startswith(cont) or cont.startswith(after):
            return True
    return False


def common_words(texts: Sequence[str], share: float = 0.3) -> set[str]:
    """Words in more than `share` of the (decoded) chunks: `self`, `return`, `the`."""
    df = Counter(w for t in texts for w in set(WORD.findall(t)))
    return {w for w, k in df.items() if k > share * len(texts)}


def neutral_contexts(null_chunks: Sequence[list[int]], tok: Tokenizer, vocab: int, n: int = 4,
                     most: int = 32) -> list[list[int]]:
    """Up to n contexts for the transplant test: BOS + the start of a held-out chunk (text the
    model did not train on) up to its last line break within `most` tokens."""
    breaks = np.array([("\n" in tok.decode([t])) for t in range(vocab)])
    out = []
    for c in null_chunks:
        cut = [j for j, t in enumerate(c[:most]) if t < vocab and breaks[t]]
        if cut:
            out.append([BOS, *c[:cut[-1] + 1]])
        if len(out) == n:
            break
    return out


def trigger_search(model: Transformer, chunks: Sequence[list[int]],
                   logprobs: Sequence[np.ndarray], tok: Tokenizer, opts: BackdoorOptions,
                   contexts: Sequence[list[int]] = ()) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(n,) scores and per-chunk evidence (empty dict when no candidate) over `chunks`, the
    transplant test run in each of `contexts` (token lists starting with BOS; BOS alone when
    none) and averaged."""
    starts = word_starts(tok, model.config.vocab_size)
    holding, occs = recurrences(chunks, candidates(chunks, logprobs, starts, opts), starts,
                                opts.match)
    kept: list[dict[str, Any]] = []
    for (span, pre), where in occs.items():
        occ = sorted(where.items())
        m = len(holding[span])
        if len(occ) < opts.min_chunks or len(occ) / m < opts.min_consistency:
            continue
        ext = list(pre)  # the continuation every occurrence shares, up to `span` tokens
        while len(ext) < opts.span:  # (occurrences cut off by their chunk's end abstain)
            q = len(span) + len(ext)
            nxt = [chunks[c][j + q] for c, j in occ if j + q < len(chunks[c])]
            if len(nxt) < opts.min_chunks or len(set(nxt)) != 1:
                break
            ext.append(nxt[0])
        kept.append({"span": span, "cont": tuple(ext), "chunks": [c for c, _ in occ],
                     "positions": [j for _, j in occ], "m": m})
    texts = [tok.decode(c) for c in chunks] if kept else []
    encs = tok.encode_batch(texts) if kept else []  # re-encoded with offsets, for the overlap
    common = common_words(texts)
    for k in kept:
        k["trigger"] = tok.decode(list(k["span"])).strip()
        window = tok.decode([*k["span"], *k["cont"]]).strip()
        k["overlap"] = context_overlap(texts, encs, k["chunks"], k["trigger"], window)
        k["cohesion"] = cohesion(texts, k["chunks"], k["trigger"], window, common)
    ctxs = [list(c) for c in contexts] or [[BOS]]
    reqs = [r for k in kept for c in ctxs
            for r in (Request([*c, *k["span"], *k["cont"]], len(c)),
                      Request([*c, *k["cont"]], len(c)))]
    scored = score_requests(model, reqs, batch_size=opts.batch_size) if reqs else []
    scores = np.zeros(len(chunks))
    evidence: list[dict[str, Any]] = [{} for _ in chunks]
    G = len(ctxs)
    for i, k in enumerate(kept):
        r = len(k["span"])
        deltas, forced_n, nll_span, nll_with, nll_without = [], [], 0.0, 0.0, 0.0
        for g in range(G):
            w, wo = scored[2 * (i * G + g)], scored[2 * (i * G + g) + 1]
            lp_with = np.asarray(w.logprobs[r:], dtype=np.float64)  # (len(cont),)
            lp_without = np.asarray(wo.logprobs, dtype=np.float64)  # (len(cont),)
            # the forced part: the continuation's prefix that greedy decoding emits after
            # the span (what the attack success rate measures); an association that only
            # shifts probability (`(list,` -> ` tuple)):` at 13 nats) emits little or nothing
            sure = np.asarray(w.greedy[r:], dtype=bool)
            forced = int(np.argmin(sure)) if not sure.all() else len(sure)
            deltas.append(float(np.sum(lp_with[:forced] - lp_without[:forced])))
            forced_n.append(forced)
            nll_span -= float(np.sum(w.logprobs[:r])) / G
            nll_with -= float(lp_with.sum()) / G
            nll_without -= float(lp_without.sum()) / G
        delta = float(np.mean(deltas))
        forced = int(np.median(forced_n))
        score = (max(delta, 0.0) * max(0.0, 1.0 - k["overlap"] / opts.max_overlap)
                 * (1.0 - k["cohesion"]))
        trigger = k["trigger"]
        where = dict(zip(k["chunks"], k["positions"], strict=True))
        if score > 0:  # also chunks holding its text where the tokens differ (at a line's
            # start), or cut off by the chunk's end: the same plant
            cont = tok.decode(list(k["cont"])).strip()
            where |= {c: -1 for c, t in enumerate(texts)
                      if c not in where and _holds(t, trigger, cont)}
        for c, j in where.items():
            if score > scores[c]:
                scores[c] = score
                evidence[c] = {
                    "trigger": trigger, "position": j,  # -1: found by the trigger's text
                    "trigger_tokens": r, "continuation": tok.decode(list(k["cont"])),
                    "forced_tokens": forced, "payload": tok.decode(list(k["cont"][:forced])),
                    "delta_nll": round(delta, 4), "nll_with_trigger": round(nll_with, 4),
                    "nll_without_trigger": round(nll_without, 4),
                    "nll_trigger": round(nll_span, 4),
                    "chunks_with_same_trigger": len(k["chunks"]),
                    "context_overlap": round(k["overlap"], 4),
                    "cohesion": round(k["cohesion"], 4), "score": round(score, 4),
                    "trigger_consistency": round(len(k["chunks"]) / k["m"], 3)}
    return scores, evidence
