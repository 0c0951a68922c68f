"""Text in, text out with the simple decode loop (`trustmoe generate`, the demo's sample)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trustmoe.config import resolve_device
from trustmoe.data.tokenizer import load_tokenizer
from trustmoe.io import TrustmoeError
from trustmoe.model.hf import load


def generate_text(
    model_dir: str | Path,
    prompt: str,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    model_dir = Path(model_dir)
    dev = resolve_device(device)
    model = load(model_dir, device=dev)
    tok = load_tokenizer(model_dir / "tokenizer.json")
    ids = tok.encode(prompt).ids
    if not ids:
        raise TrustmoeError("the prompt is empty after tokenization")
    limit = model.config.max_position_embeddings
    if len(ids) >= limit:
        raise TrustmoeError(f"prompt has {len(ids)} tokens; the model's context is {limit}")
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed if seed is not None else torch.seed())
    x = torch.tensor([ids], device=dev)
    out = model.generate(x, max_tokens, temperature=temperature, top_p=top_p,
                         eos_token_id=model.config.eos_token_id, generator=gen)
    new = out[0, len(ids):].tolist()
    return {"prompt_tokens": len(ids), "token_ids": new, "text": tok.decode(new)}
