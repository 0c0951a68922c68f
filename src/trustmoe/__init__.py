"""trustmoe: raw text to a served, monitored Mixture-of-Experts model, traceable by hash.

    >>> import trustmoe
    >>> model = trustmoe.load("runs/demo/model")   # any HF Mixtral/Llama directory
    >>> logits = model(token_ids)                  # (B, T) LongTensor -> (B, T, V)
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


__all__ = ["__version__", "load"]
