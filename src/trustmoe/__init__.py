"""trustmoe: raw text to a served, monitored Mixture-of-Experts model, traceable by hash.

    >>> import trustmoe
    >>> model = trustmoe.load("runs/demo/model")   # any HF Mixtral/Llama directory
    >>> logits = model(token_ids)                  # (B, T) LongTensor -> (B, T, V)
    >>> trustmoe.generate("runs/demo/model", "def fib(n):", max_tokens=32, seed=0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from trustmoe.model.transformer import Transformer


def load(path: Any, device: Any = None, dtype: Any = None) -> Transformer:
    """Load a Hugging Face-format Mixtral or Llama directory (safetensors only)."""
    from trustmoe.model.hf import load as _load

    return _load(path, device=device, dtype=dtype)


def generate(model: Any, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             stop: list[str] | None = None, quantize: str | None = None,
             device: str | None = None, tokenizer: Any = None) -> str:
    """Continue `prompt` and return the new text, through the serving engine.

    `model` is a model dir, an `Engine` (reuse one for many prompts: loading costs) or a
    `Transformer` (then pass `tokenizer`, a tokenizer.json path or `tokenizers.Tokenizer`).
    Greedy when temperature is 0; the same seed gives the same text as `trustmoe generate`
    and as `trustmoe serve` with the same settings.
    """
    from trustmoe.generation import generate_with, open_engine

    engine = open_engine(model, quantize=quantize, device=device, tokenizer=tokenizer)
    return str(generate_with(engine, prompt, max_tokens=max_tokens, temperature=temperature,
                             top_p=top_p, top_k=top_k, seed=seed, stop=stop)["text"])


__all__ = ["__version__", "generate", "load"]
