"""Decoder-only MoE transformer, weight-compatible with Hugging Face Mixtral and Llama.

    tokens (B, T) -> embed -> [RMSNorm -> GQA attention -> + -> RMSNorm -> MoE/SwiGLU -> +] x L
                  -> RMSNorm -> lm_head -> logits (B, T, V)

`model(idx)` returns logits; `model.run(idx, targets=...)` also returns the losses
(cross-entropy + Switch load balancing + router z-loss) and per-layer routing statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from trustmoe.config import ModelConfig
from trustmoe.model.attention import Attention, KVCacheLike, RMSNorm, RotaryEmbedding
from trustmoe.model.fast import cross_entropy
from trustmoe.model.moe import (
    MoE,
    RouterOutput,
    RoutingStats,
    SwiGLU,
    load_balancing_loss,
    router_z_loss,
    routing_stats,
)


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V)
    loss: Tensor | None = None  # total training loss
    ce_loss: Tensor | None = None
    aux_loss: Tensor | None = None  # load balancing, averaged over MoE layers
    z_loss: Tensor | None = None
    routing: list[RoutingStats] = field(default_factory=list)
    hidden_states: Tensor | None = None  # (B, T, d) after the final norm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MoE | SwiGLU = MoE(cfg) if cfg.is_moe else SwiGLU(
            cfg.hidden_size, cfg.intermediate_size
        )

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCacheLike | None,
        attn_mask: Tensor | None,
    ) -> tuple[Tensor, RouterOutput | None]:
        # x: (B, T, d)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, attn_mask)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, r = self.mlp(h)
            return x + y, r
        return x + self.mlp(h), None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_size, cfg.max_position_embeddings, cfg.rope_theta)
        # set by trustmoe.model.fast.optimize_for_training: chunked lm_head + CE when targets
        # are given (out.logits then carries no gradient); numerics equal up to fp32 round-off
        self.fused_loss = False
        self.apply(self._init_weights)
        # GPT-2 style: scale residual output projections by 1/sqrt(2L)
        scale = 0.02 / (2 * cfg.num_hidden_layers) ** 0.5
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", ".w2")):
                nn.init.normal_(p, std=scale)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(self, idx: Tensor) -> Tensor:
        """idx: (B, T) int64 token ids -> logits (B, T, V)."""
        return self.run(idx).logits

    def run(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        positions: Tensor | None = None,
        cache: KVCacheLike | None = None,
        attn_mask: Tensor | None = None,
        return_stats: bool = False,
        return_hidden: bool = False,
        ignore_index: int = -100,
    ) -> ModelOutput:
        # idx: (B, T); targets: (B, T) or None; positions: (B, T) or (T,)
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(T, device=idx.device)
        cos, sin = self.rotary(positions)  # (T, hd) or (B, T, hd)
        x = self.embed_tokens(idx)  # (B, T, d)
        routers: list[RouterOutput] = []
        for block in self.layers:
            x, r = block(x, cos, sin, cache, attn_mask)
            if r is not None:
                routers.append(r)
        x = self.norm(x)
        ce: Tensor | None = None
        if targets is None:
            logits = self.lm_head(x)  # (B, T, V)
        else:
            ce, flat_logits = cross_entropy(  # (N, V); no grad through it when fused
                x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1), ignore_index,
                fused=self.fused_loss,
            )
            logits = flat_logits.view(B, T, -1)  # (B, T, V)
        out = ModelOutput(logits=logits, hidden_states=x if return_hidden else None)
        if return_stats:
            out.routing = [routing_stats(r) for r in routers]
        if ce is not None:
            loss = ce
            if routers:
                aux = torch.stack([load_balancing_loss(r) for r in routers]).mean()
                z = torch.stack([router_z_loss(r) for r in routers]).mean()
                loss = loss + self.config.router_aux_loss_coef * aux
                loss = loss + self.config.router_z_loss_coef * z
                out.aux_loss, out.z_loss = aux, z
            out.loss, out.ce_loss = loss, ce
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
