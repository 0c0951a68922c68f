"""How far a figure is from the machine's limits: bytes and FLOPs per token, measured peaks.

Decode is bound by reading weights (and the KV cache) from memory, prefill by arithmetic; every
speed figure of the llama.cpp comparison is reported beside the bandwidth or GFLOP/s it
implies and the share of the peak measured in the same run:

- read bandwidth: the best of three full reads (a sum) of a buffer far larger than the caches,
  on the same threads (`read_bandwidth`, shared with `decode.py`);
- GEMM peak: the best of torch's (MKL) and trustmoe's GEMM on a large square product.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from trustmoe.config import ModelConfig


def active_weight_bytes(cfg: ModelConfig, bytes_per_param: float = 4.0) -> float:
    """Weights read per decoded token: everything active except the embedding table (1 row)."""
    n = cfg.num_parameters(active=True) - cfg.vocab_size * cfg.hidden_size + cfg.hidden_size
    if cfg.tie_word_embeddings:
        n += cfg.vocab_size * cfg.hidden_size
    return n * bytes_per_param


def expert_bytes(cfg: ModelConfig, bytes_per_param: float = 4.0) -> float:
    """One expert's gate, up and down matrices, in bytes."""
    return 3 * cfg.hidden_size * cfg.intermediate_size * bytes_per_param


def step_weight_bytes(cfg: ModelConfig, rows: int, bytes_per_param: float = 4.0) -> float:
    """Weights one decode step of `rows` sequences reads: the active weights once, plus the
    expected number of further distinct experts per MoE layer (uniform routing)."""
    base = active_weight_bytes(cfg, bytes_per_param)
    E, k = cfg.num_local_experts, cfg.num_experts_per_tok
    if E <= 1:
        return base
    distinct = E * (1 - (1 - k / E) ** rows)  # expected experts hit by `rows` routed tokens
    return base + max(distinct - k, 0.0) * expert_bytes(cfg, bytes_per_param) * cfg.num_hidden_layers


def kv_bytes(cfg: ModelConfig, context: float, bytes_per_value: float) -> float:
    """KV cache read by one decoded token attending to `context` positions."""
    return 2.0 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_size * context * bytes_per_value


def flops_per_token(cfg: ModelConfig, context: float, lm_head: bool = True) -> float:
    """Multiply-adds x 2 of one token: active matrices (the LM head optional: a prompt needs
    it for its last token only) and attention over `context` positions (scores and values)."""
    emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    n = cfg.num_parameters(active=True) - emb + (cfg.vocab_size * cfg.hidden_size if lm_head else 0)
    attn = 2 * cfg.num_attention_heads * cfg.head_size * context * cfg.num_hidden_layers
    return 2.0 * (n + attn)


def read_bandwidth(buf: torch.Tensor) -> float:
    """Bytes/s of one full read of `buf` (a sum; the best of three)."""
    best = float("inf")
    for _ in range(3):
        _sync(buf.device)
        t = time.perf_counter()
        buf.sum()
        _sync(buf.device)
        best = min(best, time.perf_counter() - t)
    return buf.numel() * buf.element_size() / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_peak(n: int = 1024) -> dict[str, float]:
    """GFLOP/s of an n x n x n fp32 product: torch's and trustmoe's GEMM (best of 5 each)."""
    from trustmoe.engine import cpu_kernels
    from trustmoe.engine.quantize import FloatWeight

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    fns: dict[str, Any] = {"torch": lambda: a @ b.T}
    if cpu_kernels.available() and hasattr(cpu_kernels, "gemm"):  # older trustmoe: none
        d = FloatWeight(b).c_desc()
        assert d is not None
        fns["trustmoe"] = lambda: cpu_kernels.gemm(a, d)
    out = {}
    for name, f in fns.items():
        f()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
        out[name] = round(2 * n**3 / best / 1e9, 1)
    return out


def utilisation(tok_s: float, bytes_per_token: float, flops: float, bw: float,
                peak_gflops: float) -> dict[str, float]:
    """GB/s and GFLOP/s a tokens/s figure implies, and their shares of the measured peaks."""
    gbs, gfl = tok_s * bytes_per_token / 1e9, tok_s * flops / 1e9
    return {"GB_s": round(gbs, 2), "bandwidth_share": round(gbs * 1e9 / bw, 3),
            "GFLOP_s": round(gfl, 1), "peak_share": round(gfl / peak_gflops, 3)}
