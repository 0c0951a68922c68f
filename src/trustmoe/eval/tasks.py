"""Quality: perplexity / bits per byte, and multiple-choice tasks scored by log-likelihood.

Multiple choice follows lm-evaluation-harness exactly: each choice is the continuation
`delimiter + choice` of the context (trailing context whitespace moves to the continuation,
and the continuation's tokens are those of `context + continuation` after the context's);
`acc` is the argmax of the summed log-likelihood and `acc_norm` the argmax of the summed
log-likelihood divided by the choice's length in characters. The requests go to any backend
through `LM.loglikelihood` (the torch backend packs each item into one forward pass, its
context computed once for all choices). Standard errors are the sample standard deviation over
sqrt(n), as lm-eval reports; `acc_ci95_low/high` are bootstrap percentile intervals.

Task file: JSONL, one object per line: {"context": str, "choices": [str, ...], "gold": int}
(optional "delimiter", default " ").
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trustmoe.eval.bootstrap import ci95, mean_ci
from trustmoe.eval.corpus import iter_jsonl
from trustmoe.eval.lm import ContinuationRequest
from trustmoe.eval.loglik import Scored
from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from trustmoe.eval.corpus import Corpus
    from trustmoe.eval.lm import LM
    from trustmoe.eval.moe_diag import RoutingCollector


@dataclass
class Instance:
    context: str
    choices: list[str]
    gold: int
    delimiter: str = " "


@dataclass
class Task:
    name: str
    instances: list[Instance]


@dataclass
class TaskResult:
    name: str
    lls: list[np.ndarray]  # per instance: (n_choices,) summed log-likelihoods
    golds: list[int]
    choice_chars: list[np.ndarray]  # per instance: (n_choices,) len(choice)
    metrics: dict[str, float] = field(default_factory=dict)

    def correct(self, norm: bool = False) -> np.ndarray:
        return np.array([int(np.argmax(self._s(i, norm)) == g) for i, g in enumerate(self.golds)])

    def _s(self, i: int, norm: bool) -> np.ndarray:
        return self.lls[i] / self.choice_chars[i] if norm else self.lls[i]

    def probs(self) -> list[np.ndarray]:
        """Softmax over each instance's choice log-likelihoods (for calibration)."""
        out = []
        for ll in self.lls:
            z = ll - ll.max()
            out.append(np.exp(z) / np.exp(z).sum())
        return out


def mean_stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


# ---------------------------------------------------------------- task files


def load_task_file(path: Path) -> Task:
    """Read and validate a JSONL task file; every problem names the file and line."""
    if not path.is_file():
        raise TrustmoeError(f"task file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TrustmoeError(f"task file {path} is not valid UTF-8 (byte {e.start})") from None
    instances = []
    for n, obj in iter_jsonl(path, text):
        instances.append(_instance(obj, f"{path}:{n}"))
    if not instances:
        raise TrustmoeError(f"task file {path} has no instances")
    return Task(path.stem, instances)


def _instance(obj: Any, where: str) -> Instance:
    if not isinstance(obj, dict):
        raise TrustmoeError(f"{where}: expected a JSON object with context, choices, gold")
    missing = [k for k in ("context", "choices", "gold") if k not in obj]
    if missing:
        raise TrustmoeError(f"{where}: missing field(s) {', '.join(missing)}")
    ctx, choices, gold = obj["context"], obj["choices"], obj["gold"]
    if not isinstance(ctx, str):
        raise TrustmoeError(f"{where}: context must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(
        isinstance(c, str) and c for c in choices
    ):
        raise TrustmoeError(f"{where}: choices must be a list of at least 2 non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise TrustmoeError(f"{where}: gold {gold!r} is not an index into {len(choices)} choices")
    delim = obj.get("delimiter", " ")
    if not isinstance(delim, str):
        raise TrustmoeError(f"{where}: delimiter must be a string")
    return Instance(ctx, list(choices), gold, delim)


# ---------------------------------------------------------------- built-in tasks


def builtin_tasks(corpus: Corpus, n: int, seed: int = 0, n_choices: int = 4) -> list[Task]:
    """Tasks made from held-out documents, so nothing needs downloading.

    next-line: given up to 4 lines of a document, pick its real next line among lines of other
    documents. next-words: given up to 48 words of a document, pick its real next 8 words
    among 8-word spans of other documents. One instance per document first; when that gives
    fewer than n (a small held-out split), further rounds take other positions of the same
    documents until n or until every position is used.
    """
    texts = [corpus.text(d) for d in corpus.val]
    rng = random.Random(seed)
    tasks = []
    lines = [[ln for ln in t.split("\n") if ln.strip()] for t in texts]
    pool = [(i, ln) for i, ls in enumerate(lines) for ln in ls[1:]]

    def next_line(i: int, k: int) -> Instance | None:
        ls = lines[i]
        wrong = [ln for j, ln in pool if j != i and ln != ls[k]]
        if len(set(wrong)) < n_choices - 1:
            return None
        return _mc("\n".join(ls[max(0, k - 4):k]) + "\n", ls[k],
                   rng.sample(sorted(set(wrong)), n_choices - 1), rng, "")

    inst = _rounds([range(1, len(ls)) if len(ls) >= 2 else range(0) for ls in lines], n, rng,
                   next_line)
    if len(inst) >= 4:
        tasks.append(Task("next-line", inst))
    words = [re.findall(r"\S+", t) for t in texts]
    spans = [(i, " ".join(w[s:s + 8])) for i, w in enumerate(words)
             for s in range(4, max(4, len(w) - 8), 8)]

    def next_words(i: int, c: int) -> Instance | None:
        w = words[i]
        gold = " ".join(w[c:c + 8])
        wrong = sorted({s for j, s in spans if j != i and s != gold})
        if len(wrong) < n_choices - 1:
            return None
        return _mc(" ".join(w[max(0, c - 48):c]), gold, rng.sample(wrong, n_choices - 1), rng, " ")

    inst = _rounds([range(4, len(w) - 7) if len(w) >= 12 else range(0) for w in words], n, rng,
                   next_words)
    if len(inst) >= 4:
        tasks.append(Task("next-words", inst))
    return tasks


def _rounds(positions: list[range], n: int, rng: random.Random,
            make: Callable[[int, int], Instance | None]) -> list[Instance]:
    """Up to n instances: a random position of each document per round, never one twice."""
    inst: list[Instance] = []
    used: set[tuple[int, int]] = set()
    first = True
    while len(inst) < n:
        for i, pos in enumerate(positions):
            if len(inst) >= n:
                break
            if first:  # one random position per document (the rng order of earlier versions)
                if not pos:
                    continue
                k = rng.randrange(pos.start, pos.stop)
            else:
                free = [x for x in pos if (i, x) not in used]
                if not free:
                    continue
                k = rng.choice(free)
            used.add((i, k))
            made = make(i, k)
            if made is not None:
                inst.append(made)
        first = False
        if all((i, x) in used for i, pos in enumerate(positions) for x in pos):
            break
    return inst


def _mc(context: str, gold: str, wrong: list[str], rng: random.Random, delim: str) -> Instance:
    choices = [gold, *wrong]
    rng.shuffle(choices)
    return Instance(context, choices, choices.index(gold), delim)


# ---------------------------------------------------------------- scoring


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing context spaces join the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def lm_encoder(lm: LM) -> Callable[[str], list[int]]:
    """Text -> ids without BOS with the LM's codec (requests add the BOS)."""
    codec = lm.codec
    if codec is None:
        raise TrustmoeError("this backend has no tokenizer: text tasks need one")
    return lambda text: codec.encode(text, add_bos=False)


def score_task(lm: LM, task: Task, *, routing: RoutingCollector | None = None,
               seed: int = 0) -> TaskResult:
    encode = lm_encoder(lm)
    reqs: list[ContinuationRequest] = []
    spans: list[tuple[int, int]] = []
    for inst in task.instances:
        pairs = [encode_pair(encode, inst.context, inst.delimiter + ch) for ch in inst.choices]
        spans.append((len(reqs), len(pairs)))
        reqs += [ContinuationRequest(ctx, cont) for ctx, cont in pairs]
    flat = lm.loglikelihood(reqs, routing=routing)
    lls = [[s.total for s in flat[a:a + n]] for a, n in spans]
    res = TaskResult(
        name=task.name, lls=[np.array(x) for x in lls], golds=[x.gold for x in task.instances],
        choice_chars=[np.array([float(len(c)) for c in x.choices]) for x in task.instances],
    )
    acc, acc_norm = res.correct(False), res.correct(True)
    lo, hi = mean_ci(acc, seed)
    res.metrics = {
        "n": len(task.instances), "acc": float(acc.mean()), "acc_stderr": mean_stderr(acc),
        "acc_ci95_low": lo, "acc_ci95_high": hi,
        "acc_norm": float(acc_norm.mean()), "acc_norm_stderr": mean_stderr(acc_norm),
        "chance": float(np.mean([1 / len(x.choices) for x in task.instances])),
    }
    return res


# ---------------------------------------------------------------- perplexity


def perplexity(scored: Sequence[Scored], texts: Sequence[str], seed: int = 0
               ) -> dict[str, float]:
    """Token perplexity, bits per UTF-8 byte and word perplexity over whole documents, with
    bootstrap 95% intervals over documents (documents are the sampling unit)."""
    tokens = sum(s.n for s in scored)
    if tokens == 0:
        raise TrustmoeError("no tokens to compute perplexity on")
    doc_nll = np.array([-s.total for s in scored])
    doc_tok = np.array([float(s.n) for s in scored])
    doc_bytes = np.array([float(len(t.encode("utf-8"))) for t in texts])
    nll = float(doc_nll.sum())
    n_bytes = int(doc_bytes.sum())
    n_words = sum(len(re.findall(r"\S+", t)) for t in texts)
    p_lo, p_hi = ci95(lambda i: math.exp(doc_nll[i].sum() / max(doc_tok[i].sum(), 1)),
                      len(scored), seed)
    b_lo, b_hi = ci95(lambda i: doc_nll[i].sum() / math.log(2) / max(doc_bytes[i].sum(), 1),
                      len(scored), seed)
    return {
        "documents": len(texts), "tokens": tokens, "bytes": n_bytes,
        "nll_per_token": nll / tokens,
        "perplexity": math.exp(nll / tokens),
        "perplexity_ci95_low": p_lo, "perplexity_ci95_high": p_hi,
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "bits_per_byte_ci95_low": b_lo, "bits_per_byte_ci95_high": b_hi,
        "word_perplexity": math.exp(nll / max(n_words, 1)),
    }
