"""Checkpoints in the model-directory format, plus optimizer state in safetensors.

A checkpoint directory is a complete Hugging Face model directory (loadable by
`trustmoe.load` and `transformers`) with two extra files: `train_state.safetensors`
(AdamW moments and step counts; never pickle) and `metrics.jsonl`. It is written under a
temporary name and swapped in, so an interrupted save never corrupts the previous one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trustmoe.io import TrustmoeError, atomic_dir, read_json
from trustmoe.model.hf import save_model
from trustmoe.model.transformer import Transformer
from trustmoe.security.integrity import write_manifest

STATE_FILE = "train_state.safetensors"
METRICS_FILE = "metrics.jsonl"


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    i = 0
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                t = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                out[f"param.{i}.{key}"] = t.detach().contiguous().cpu()
            i += 1
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    i = 0
    for group in opt.param_groups:
        for p in group["params"]:
            prefix = f"param.{i}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                for key, v in state.items():
                    if key != "step" and v.shape != p.shape:
                        raise TrustmoeError(
                            f"optimizer state {prefix}{key} has shape {tuple(v.shape)}, "
                            f"parameter has {tuple(p.shape)}: checkpoint is from another model"
                        )
                opt.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in state.items()}
            i += 1


def save_checkpoint(
    out_dir: Path,
    model: Transformer,
    opt: torch.optim.Optimizer,
    tokenizer_file: Path,
    metadata: dict[str, Any],
    train_state: dict[str, Any],
    metrics_src: Path | None,
) -> None:
    with atomic_dir(out_dir) as tmp:
        save_model(model, tmp, tokenizer_file=tokenizer_file, metadata=metadata)
        tok_cfg = tokenizer_file.parent / "tokenizer_config.json"
        if tok_cfg.exists():
            shutil.copyfile(tok_cfg, tmp / "tokenizer_config.json")
        save_file(optimizer_tensors(opt), str(tmp / STATE_FILE),
                  metadata={"train_state": json.dumps(train_state, sort_keys=True)})
        if metrics_src is not None and metrics_src.exists():
            shutil.copyfile(metrics_src, tmp / METRICS_FILE)
        write_manifest(tmp)  # last, so it covers the optimizer state and metrics too


def read_train_state(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = ckpt_dir / STATE_FILE
    if not path.exists():
        raise TrustmoeError(
            f"cannot resume: {ckpt_dir} has no {STATE_FILE} (no checkpoint was written there)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["train_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (KeyError, json.JSONDecodeError, Exception) as e:
        raise TrustmoeError(f"cannot resume: {path} is corrupt ({e})") from None
    return meta, tensors


def read_model_metadata(ckpt_dir: Path) -> dict[str, Any]:
    data = read_json(ckpt_dir / "trustmoe.json", "trustmoe.json")
    return data if isinstance(data, dict) else {}
