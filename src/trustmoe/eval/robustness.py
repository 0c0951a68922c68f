"""Robustness to meaning-preserving perturbations, HELM style, with per-instance worst case.

Each perturbation rewrites an instance's context with a seeded RNG (the choices stay, as HELM
perturbs inputs, not references): keyboard typos, lowercasing, contractions, extra whitespace
and, for code, consistent identifier renaming. `robustness` reports accuracy on the original
and on every perturbed copy, and the worst case: an instance counts as correct only if it is
correct on the original and on every perturbation (HELM's robustness metric).
"""

from __future__ import annotations

import keyword
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from trustmoe.eval.tasks import Instance, Task, mean_stderr, score_task

if TYPE_CHECKING:
    from trustmoe.eval.lm import LM

KEYBOARD_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
CONTRACTIONS = {
    "do not": "don't", "does not": "doesn't", "did not": "didn't", "is not": "isn't",
    "are not": "aren't", "was not": "wasn't", "were not": "weren't", "can not": "can't",
    "cannot": "can't", "will not": "won't", "would not": "wouldn't", "should not": "shouldn't",
    "could not": "couldn't", "have not": "haven't", "has not": "hasn't", "had not": "hadn't",
    "it is": "it's", "that is": "that's", "there is": "there's", "i am": "i'm",
    "you are": "you're", "we are": "we're", "they are": "they're", "i will": "i'll",
    "you will": "you'll", "we will": "we'll", "they will": "they'll", "i have": "i've",
    "let us": "let's",
}
_CONTRACT_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in CONTRACTIONS) + r")\b",
                          re.IGNORECASE)
_BUILTINS = {"print", "len", "range", "self", "True", "False", "None", "int", "str", "list",
             "dict", "set", "float", "return"}


def _neighbours() -> dict[str, str]:
    out: dict[str, str] = {}
    for r, row in enumerate(KEYBOARD_ROWS):
        for c, ch in enumerate(row):
            near = [row[j] for j in (c - 1, c + 1) if 0 <= j < len(row)]
            for rr in (r - 1, r + 1):
                if 0 <= rr < len(KEYBOARD_ROWS):
                    near += [KEYBOARD_ROWS[rr][j] for j in (c - 1, c, c + 1)
                             if 0 <= j < len(KEYBOARD_ROWS[rr])]
            out[ch] = "".join(near)
    return out


NEIGHBOURS = _neighbours()


def typos(text: str, rng: random.Random, prob: float = 0.05) -> str:
    """Replace letters with a keyboard neighbour with probability `prob` (case kept)."""
    out = []
    for ch in text:
        low = ch.lower()
        if low in NEIGHBOURS and rng.random() < prob:
            new = rng.choice(NEIGHBOURS[low])
            out.append(new.upper() if ch.isupper() else new)
        else:
            out.append(ch)
    return "".join(out)


def lowercase(text: str, rng: random.Random) -> str:
    return text.lower()


def contract(text: str, rng: random.Random) -> str:
    """Expanded forms to contractions ("do not" -> "don't"), keeping a leading capital."""

    def sub(m: re.Match[str]) -> str:
        rep = CONTRACTIONS[m.group(0).lower()]
        return rep[0].upper() + rep[1:] if m.group(0)[0].isupper() else rep

    return _CONTRACT_RE.sub(sub, text)


def extra_space(text: str, rng: random.Random, max_spaces: int = 3) -> str:
    """Each space becomes 1..max_spaces spaces."""
    return re.sub(" ", lambda _m: " " * rng.randint(1, max_spaces), text)


def looks_like_code(text: str) -> bool:
    return bool(re.search(r"^\s*(def|class|import|for|if|return)\b|[;{}]|\w+\s*=\s*\S", text,
                          re.MULTILINE))


def rename_identifiers(text: str, rng: random.Random) -> str:
    """For code: rename names bound by def/class/assignment/for consistently (v0, v1, ...)."""
    if not looks_like_code(text):
        return text
    bound = re.findall(r"\b(?:def|class)\s+([A-Za-z_]\w*)|\b([A-Za-z_]\w*)\s*=(?!=)"
                       r"|\bfor\s+([A-Za-z_]\w*)\s+in\b", text)
    names = sorted({n for grp in bound for n in grp if n and not keyword.iskeyword(n)
                    and n not in _BUILTINS})
    if not names:
        return text
    rng.shuffle(names)
    mapping = {n: f"v{i}" for i, n in enumerate(names)}
    return re.sub(r"\b[A-Za-z_]\w*\b", lambda m: mapping.get(m.group(0), m.group(0)), text)


PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "typos": typos,
    "lowercase": lowercase,
    "contractions": contract,
    "extra_space": extra_space,
    "identifiers": rename_identifiers,
}


def perturb_task(task: Task, name: str, seed: int) -> Task:
    fn = PERTURBATIONS[name]
    out = []
    for i, inst in enumerate(task.instances):
        rng = random.Random(f"{seed}:{name}:{i}")
        out.append(Instance(fn(inst.context, rng), inst.choices, inst.gold, inst.delimiter))
    return Task(f"{task.name}+{name}", out)


def robustness(
    lm: LM, task: Task, *, seed: int = 0, perturbations: tuple[str, ...] = tuple(PERTURBATIONS),
    base_correct: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracy before/after each perturbation and per-instance worst case (any backend)."""
    if base_correct is None:
        base_correct = score_task(lm, task).correct()
    worst = base_correct.copy()
    per: dict[str, Any] = {}
    for name in perturbations:
        pt = perturb_task(task, name, seed)
        changed = sum(a.context != b.context for a, b in zip(pt.instances, task.instances,
                                                            strict=True))
        if changed == 0:
            per[name] = {"changed": 0, "acc": float(base_correct.mean())}
            continue
        corr = score_task(lm, pt).correct()
        worst = np.minimum(worst, corr)
        per[name] = {"changed": int(changed), "acc": float(corr.mean()),
                     "delta": float(corr.mean() - base_correct.mean()),
                     "flipped": int((corr != base_correct).sum())}
    return {
        "n": len(task.instances),
        "acc": float(base_correct.mean()),
        "worst_case_acc": float(worst.mean()),
        "worst_case_acc_stderr": mean_stderr(worst),
        "perturbations": per,
    }
