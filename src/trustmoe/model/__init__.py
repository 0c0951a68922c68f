"""The MoE transformer: one definition of its maths, the training module, HF import/export
(decoding lives in `trustmoe.engine`).

    functional.py   the forward pass as pure tensor functions (RMSNorm, RoPE, GQA attention,
                    routing, SwiGLU experts, combine, shared expert): the one definition that
                    the training module here and the engine's torch path both call, and that
                    the engine's C kernels are tested equal to
    attention.py    RMSNorm, rotary tables and attention as modules (parameters only)
    moe.py          the MoE layer: sorted, dropless expert dispatch with a custom backward
                    (the training fast path), router losses and statistics
    transformer.py  the decoder (`Transformer`: `model(idx)` logits, `model.run(...)` losses)
    fast.py         the training switch: fused, chunked lm_head + cross-entropy
    hf.py           Hugging Face directories: save / load, and the tensor naming the engine reads
    gguf.py         llama.cpp export

Training-only options (`ModelConfig.capacity_factor`, the router loss coefficients) act only
in `train()` mode or on the loss; `eval()` and inference are dropless. Nothing here knows of
serving: paged KV caches, kernels and quantized layouts are `trustmoe.engine`'s.
"""

from trustmoe.model.hf import ModelLoadError, load, load_config, save_model
from trustmoe.model.transformer import ModelOutput, Transformer

__all__ = ["ModelLoadError", "ModelOutput", "Transformer", "load", "load_config", "save_model"]
