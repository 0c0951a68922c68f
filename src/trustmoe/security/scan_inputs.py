"""Inputs of a security scan: the model and dataset checked against each other, audit chunks,
and the reference model (trained by the scan on held-out chunks when none is given).

Refused with one clear line: a model dir or dataset dir that is missing or incomplete, a
model whose tokenizer differs from the dataset's, and a model whose `trustmoe.json` names a
different dataset manifest (SHA-256) than DATA's.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from trustmoe.data import canaries as cn
from trustmoe.io import TrustmoeError, atomic_write_json, read_json, sha256_bytes, sha256_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from trustmoe.model.transformer import Transformer

EOS = 0


@dataclass
class AuditInputs:
    model: Transformer
    tokenizer: Tokenizer
    model_dir: Path
    data_dir: Path
    canaries: list[cn.Canary]
    train_chunks: list[list[int]]
    val_chunks: list[list[int]]
    train_chunk_ids: list[str]  # "train:<doc index>:<chunk index>"
    val_chunk_docs: list[int] = field(default_factory=list)  # document index of each val chunk
    model_info: dict[str, Any] = field(default_factory=dict)
    data_info: dict[str, Any] = field(default_factory=dict)
    # the backdoor screen's wider sample (a trigger in 1% of documents must recur in it)
    backdoor_train: list[list[int]] = field(default_factory=list)
    backdoor_val: list[list[int]] = field(default_factory=list)
    backdoor_train_ids: list[str] = field(default_factory=list)


def check_pair(model_dir: Path, data_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and dataset exist and belong together; returns (model_info, data_info)."""
    if not (model_dir / "config.json").exists():
        raise TrustmoeError(f"model directory not found or incomplete (no config.json): {model_dir}")
    for name in ("manifest.json", "tokenizer.json", "train.bin", "val.bin"):
        if not (data_dir / name).exists():
            raise TrustmoeError(f"dataset directory {data_dir} has no {name}: "
                                "pass a directory written by `trustmoe data build`")
    meta = read_json(model_dir / "trustmoe.json", "trustmoe.json") if (
        model_dir / "trustmoe.json").exists() else {}
    manifest_sha = sha256_file(data_dir / "manifest.json")
    trained_on = meta.get("dataset_manifest_sha256") if isinstance(meta, dict) else None
    if trained_on and trained_on != manifest_sha:
        raise TrustmoeError(f"model {model_dir} was trained on dataset {trained_on[:12]}…, but "
                            f"{data_dir} is dataset {manifest_sha[:12]}…: pass the dataset the "
                            "model was trained on")
    tok_model = model_dir / "tokenizer.json"
    if tok_model.exists() and _tokenizer_key(tok_model) != _tokenizer_key(data_dir / "tokenizer.json"):
        raise TrustmoeError(f"model {model_dir} and dataset {data_dir} use different tokenizers; "
                            "the audit needs the dataset the model was trained on")
    man = read_json(data_dir / "manifest.json", "dataset manifest")
    counts = man.get("counts", {}) if isinstance(man, dict) else {}
    audit_p = data_dir / "audit.json"
    poison = None
    if audit_p.exists():
        a = read_json(audit_p, "audit.json")
        poison = len(a.get("poisoning", [])) if isinstance(a, dict) else None
    dp = meta.get("dp") if isinstance(meta, dict) else None
    model_info = {"dir": str(model_dir), "preset": meta.get("preset"), "steps": meta.get("step"),
                  "weights_sha256": sha256_file(model_dir / "model.safetensors")
                  if (model_dir / "model.safetensors").exists() else None,
                  "dataset_manifest_sha256": trained_on,
                  "dp_epsilon": dp.get("epsilon") if isinstance(dp, dict) else None,
                  "dp": dp}
    data_info = {"dir": str(data_dir), "manifest_sha256": manifest_sha,
                 "documents_kept": counts.get("kept"), "poisoning_findings": poison,
                 "canaries": man.get("canaries") if isinstance(man, dict) else None}
    return model_info, data_info


def _tokenizer_key(path: Path) -> str:
    """Hash of a tokenizer's vocabulary and merges (formatting differences do not count)."""
    d = read_json(path, "tokenizer.json")
    m = d.get("model", {}) if isinstance(d, dict) else {}
    key = json.dumps([m.get("vocab"), m.get("merges"), d.get("added_tokens")], sort_keys=True)
    return sha256_bytes(key.encode())


def split_chunks(tokens: np.ndarray, chunk: int, skip: set[tuple[int, ...]]
                 ) -> list[tuple[str, list[int]]]:
    """Documents (EOS-separated) cut into consecutive chunks of `chunk` tokens (the last one
    kept when at least chunk/4 long); documents in `skip` (canaries) are left out."""
    from trustmoe.eval.corpus import split_documents

    out = []
    for d, doc in enumerate(split_documents(np.asarray(tokens), EOS, min_len=2)):
        ids = doc.astype(np.int64).tolist()
        if tuple(ids) in skip:
            continue
        for c, s in enumerate(range(0, len(ids), chunk)):
            piece = ids[s:s + chunk]
            if len(piece) >= max(8, chunk // 4):
                out.append((f"{d}:{c}", piece))
    return out


def _sample(chunks: list[tuple[str, list[int]]], n: int, key: list[int]
            ) -> list[tuple[str, list[int]]]:
    """Up to n chunks drawn without replacement (all when there are fewer), in order."""
    if len(chunks) <= n:
        return chunks
    pick = np.random.default_rng(key).choice(len(chunks), n, replace=False)
    return [chunks[i] for i in sorted(pick.tolist())]


def load_inputs(model_dir: Path, data_dir: Path, n_chunks: int, chunk_tokens: int, seed: int,
                device: str | None = None, n_backdoor: int = 0) -> AuditInputs:
    import trustmoe
    from trustmoe.data.shards import open_tokens
    from trustmoe.data.tokenizer import load_tokenizer

    model_info, data_info = check_pair(model_dir, data_dir)
    tok = load_tokenizer(data_dir)
    canaries = cn.load(data_dir)
    if data_info["canaries"] and not canaries:
        raise TrustmoeError(f"{data_dir}/manifest.json lists canaries but canaries.json is missing")
    model = trustmoe.load(model_dir, device=device)
    if model.config.vocab_size < tok.get_vocab_size():
        raise TrustmoeError(f"model vocabulary ({model.config.vocab_size}) is smaller than the "
                            f"dataset tokenizer's ({tok.get_vocab_size()})")
    skip = {tuple(tok.encode(c.text + "\n").ids) for c in canaries}
    chunks, wide = {}, {}
    for split, off in (("train", 1), ("val", 2)):
        every = split_chunks(open_tokens(data_dir, split), chunk_tokens, skip)
        chunks[split] = _sample(every, n_chunks, [seed, off])
        wide[split] = _sample(every, max(n_backdoor, n_chunks), [seed, off + 10])
    if not chunks["train"] or not chunks["val"]:
        raise TrustmoeError(f"{data_dir} needs documents in both splits (train and val) to audit")
    model_info["parameters"] = sum(p.numel() for p in model.parameters())
    data_info.update(train_chunks=len(chunks["train"]), val_chunks=len(chunks["val"]),
                     backdoor_train_chunks=len(wide["train"]) if n_backdoor else None,
                     backdoor_val_chunks=len(wide["val"]) if n_backdoor else None)
    return AuditInputs(model, tok, model_dir, data_dir, canaries,
                       [c for _, c in chunks["train"]], [c for _, c in chunks["val"]],
                       [f"train:{i}" for i, _ in chunks["train"]],
                       val_chunk_docs=[int(i.split(":")[0]) for i, _ in chunks["val"]],
                       model_info=model_info, data_info=data_info,
                       backdoor_train=[c for _, c in wide["train"]],
                       backdoor_val=[c for _, c in wide["val"]],
                       backdoor_train_ids=[f"train:{i}" for i, _ in wide["train"]])


def train_reference(inp: AuditInputs, chunks: list[list[int]], ref_dir: Path,
                    steps: int | None) -> tuple[Transformer, dict[str, Any]]:
    """Train a model of the target's preset on held-out `chunks` only (reused when the same
    scan already trained it). Returns (model, note for security.json)."""
    import trustmoe
    from trustmoe.data.shards import write_shard
    from trustmoe.train import train

    meta = read_json(inp.model_dir / "trustmoe.json", "trustmoe.json") if (
        inp.model_dir / "trustmoe.json").exists() else {}
    preset = meta.get("preset") or "tiny"
    targs = meta.get("train_args", {})
    n_steps = steps or int(meta.get("step") or 200)
    tokens = np.concatenate([np.asarray([*c, EOS], dtype=np.int64) for c in chunks])
    seq = int(min(targs.get("seq_len", 128), max(16, len(tokens) // 4)))
    key = sha256_bytes(json.dumps([preset, n_steps, seq, tokens.tolist(),
                                   inp.data_info["manifest_sha256"]]).encode())
    note = {"source": "trained by the scan on half of the held-out documents", "dir": str(ref_dir),
            "preset": preset, "steps": n_steps, "chunks": len(chunks), "tokens": len(tokens),
            "split": "held-out documents, half for the reference, half as non-members"}
    marker = ref_dir.with_name(ref_dir.name + ".json")
    if marker.exists() and (ref_dir / "model.safetensors").exists():
        with_key = read_json(marker, "reference marker")
        if isinstance(with_key, dict) and with_key.get("key") == key:
            return trustmoe.load(ref_dir, device=inp.model.device), note | {"reused": True}
    shutil.rmtree(ref_dir, ignore_errors=True)
    data = ref_dir.with_name(ref_dir.name + ".data")
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    try:
        shutil.copyfile(inp.data_dir / "tokenizer.json", data / "tokenizer.json")
        write_shard(data / "train.bin", tokens, inp.tokenizer.get_vocab_size())
        write_shard(data / "val.bin", tokens[: max(4 * (seq + 2), len(tokens) // 10)],
                    inp.tokenizer.get_vocab_size())
        over = {k: targs[k] for k in ("batch_size", "lr", "warmup_steps", "seed") if k in targs}
        over |= {"seq_len": seq, "eval_every": n_steps, "checkpoint_every": n_steps,
                 "eval_batches": 1}
        train(data, ref_dir, preset, max_steps=n_steps, overrides=over, progress=False,
              device=str(inp.model.device))
    finally:
        shutil.rmtree(data, ignore_errors=True)
    atomic_write_json(marker, {"key": key})
    return trustmoe.load(ref_dir, device=inp.model.device), note
