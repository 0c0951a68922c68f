"""The MoE transformer, its Hugging Face import/export and a simple decode loop."""

from trustmoe.model.hf import ModelLoadError, load, load_config, save_model
from trustmoe.model.transformer import ModelOutput, Transformer

__all__ = ["ModelLoadError", "ModelOutput", "Transformer", "load", "load_config", "save_model"]
