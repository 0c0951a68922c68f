"""The runner's weight layout: fused QKV, fused gate+up per expert, every matrix a `Weight`.

`build_weights` reads a `Transformer`'s public parameters once into this layout (quantizing
when asked); `trustmoe.engine.artifact` reads a saved quantized artifact into the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from trustmoe.config import ModelConfig
from trustmoe.model.moe import MoE
from trustmoe.engine.quantize import Weight, make_weight
from trustmoe.model.transformer import Block, Transformer


@dataclass
class LayerWeights:
    ln1: Tensor  # (d,)
    wqkv: Weight  # (H*hd + 2*Hkv*hd, d)
    wo: Weight  # (d, H*hd)
    ln2: Tensor  # (d,)
    router: Weight | None  # (E, d), kept in float
    w13: list[Weight]  # per expert (2h, d); one entry for a dense layer
    w2: list[Weight]  # per expert (d, h)
    w13_stack: Tensor | None = None  # (E, 2h, d) for the gather path (float only)
    w2_stack: Tensor | None = None  # (E, d, h)
    shared13: Weight | None = None
    shared2: Weight | None = None
    shared_gate: Weight | None = None


@dataclass
class RunnerWeights:
    cfg: ModelConfig
    embed: Tensor  # (V, d)
    layers: list[LayerWeights]
    norm: Tensor  # (d,)
    lm_head: Weight  # (V, d)
    cos: Tensor  # (max_pos, hd)
    sin: Tensor
    dtype: torch.dtype
    quantize: str | None = None

    def all_weights(self) -> list[Weight]:
        out: list[Weight] = [self.lm_head]
        for lw in self.layers:
            out += [lw.wqkv, lw.wo, *lw.w13, *lw.w2]
            out += [w for w in (lw.router, lw.shared13, lw.shared2, lw.shared_gate) if w]
        return out

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.all_weights()) + self.embed.numel() * self.embed.element_size()


def rope_tables(cfg: ModelConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    hd = cfg.head_size
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    t = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
    freqs = torch.outer(t, inv)  # (P, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (P, hd)
    # sin with the first half negated: rotate_half(x) * sin == x.roll(hd/2) * signed_sin
    sin = emb.sin()
    sin[:, : hd // 2] = -sin[:, : hd // 2]
    return emb.cos().to(device), sin.to(device)


@torch.no_grad()
def build_weights(model: Transformer, quantize: str | None = None, group_size: int = 64,
                  device: torch.device | None = None, dtype: torch.dtype | None = None,
                  exact_int8: bool = False) -> RunnerWeights:
    """Read the model's parameters into the runner's layout (quantizing if asked)."""
    cfg = model.config
    device = device or model.device
    dtype = dtype or model.embed_tokens.weight.dtype

    def W(t: Tensor, q: str | None = quantize) -> Weight:
        w = make_weight(t.detach().to(device=device, dtype=torch.float32 if q else dtype), q,
                        group_size, exact_int8)
        return w

    layers: list[LayerWeights] = []
    for blk in cast(list[Block], list(model.layers)):
        a = blk.self_attn
        wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dim=0)
        mlp = blk.mlp
        lw = LayerWeights(
            ln1=blk.input_layernorm.weight.detach().to(device, dtype), wqkv=W(wqkv),
            wo=W(a.o_proj.weight), ln2=blk.post_attention_layernorm.weight.detach().to(device, dtype),
            router=None, w13=[], w2=[],
        )
        if isinstance(mlp, MoE):
            lw.router = W(mlp.gate.weight, None)
            lw.w13 = [W(mlp.w13[e]) for e in range(mlp.num_experts)]
            lw.w2 = [W(mlp.w2[e]) for e in range(mlp.num_experts)]
            if quantize is None and device.type != "cpu":
                lw.w13_stack = mlp.w13.detach().to(device, dtype)
                lw.w2_stack = mlp.w2.detach().to(device, dtype)
            if mlp.shared_expert is not None and mlp.shared_expert_gate is not None:
                se = mlp.shared_expert
                lw.shared13 = W(torch.cat([se.gate_proj.weight, se.up_proj.weight], dim=0))
                lw.shared2 = W(se.down_proj.weight)
                lw.shared_gate = W(mlp.shared_expert_gate.weight, None)
        else:
            lw.w13 = [W(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0))]
            lw.w2 = [W(mlp.down_proj.weight)]
        layers.append(lw)
    cos, sin = rope_tables(cfg, device)
    return RunnerWeights(
        cfg=cfg, embed=model.embed_tokens.weight.detach().to(device, dtype), layers=layers,
        norm=model.norm.weight.detach().to(device, dtype), lm_head=W(model.lm_head.weight),
        cos=cos.to(dtype), sin=sin.to(dtype), dtype=dtype, quantize=quantize,
    )


__all__ = ["LayerWeights", "RunnerWeights", "build_weights", "rope_tables"]
