"""The MoE transformer and its Hugging Face import/export (decoding lives in `trustmoe.engine`)."""

from trustmoe.model.hf import ModelLoadError, load, load_config, save_model
from trustmoe.model.transformer import ModelOutput, Transformer

__all__ = ["ModelLoadError", "ModelOutput", "Transformer", "load", "load_config", "save_model"]
