"""The runner's weight layout, read from one documented naming.

The engine reads weights only by name, from a `Mapping[str, Tensor]`: the Hugging Face
Mixtral/Llama state-dict names that `model.safetensors` holds (what `trustmoe.model.save_model`
writes and `transformers` saves; `trustmoe.model.hf.hf_state_dict(model)` gives them for a
model in memory, `canonical_hf_names` maps transformers' fused in-memory layout onto them).
With i a layer, e an expert, H/Hkv query/key-value heads of width hd, E experts of width h,
`L` = `model.layers.{i}` and `M` = `L.block_sparse_moe` (MoE layers) or `L.mlp` (dense):

| name                                          | shape                  | runner layout              |
| --------------------------------------------- | ---------------------- | -------------------------- |
| `model.embed_tokens.weight`                   | (V, d)                 | `embed`                    |
| `L.input_layernorm.weight`                    | (d,)                   | `ln1`                      |
| `L.self_attn.q_proj.weight`, `k_proj`, `v_proj` | (H*hd, d), (Hkv*hd, d) | `wqkv` rows [q; k; v]      |
| `L.self_attn.o_proj.weight`                   | (d, H*hd)              | `wo`                       |
| `L.post_attention_layernorm.weight`           | (d,)                   | `ln2`                      |
| `M.gate.weight`                               | (E, d)                 | `router` (kept in float)   |
| `M.experts.{e}.w1.weight`, `w3`               | (h, d)                 | `w13[e]` rows [w1; w3]     |
| `M.experts.{e}.w2.weight`                     | (d, h)                 | `w2[e]`                    |
| `M.shared_expert.gate_proj.weight`, `up_proj` | (hs, d)                | `shared13` rows [gate; up] |
| `M.shared_expert.down_proj.weight`            | (d, hs)                | `shared2`                  |
| `M.shared_expert_gate.weight`                 | (1, d)                 | `shared_gate` (float)      |
| `M.gate_proj.weight`, `up_proj` (dense)       | (h, d)                 | `w13[0]` rows [gate; up]   |
| `M.down_proj.weight` (dense)                  | (d, h)                 | `w2[0]`                    |
| `model.norm.weight`                           | (d,)                   | `norm`                     |
| `lm_head.weight` (absent when tied)           | (V, d)                 | `lm_head` (else the embed) |

A quantized artifact (`trustmoe.engine.artifact`) uses the same names, each matrix stored in
one of the forms of `trustmoe.engine.quantize.Weight.parts()` (`NAME.q` + `NAME.scale`, ...);
for a tied model it also stores the quantized head as `lm_head.weight`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from trustmoe.config import ModelConfig
from trustmoe.engine.quantize import FloatWeight, Weight, cat_rows, make_weight, read_weight
from trustmoe.model import functional as tf
from trustmoe.model.hf import ModelLoadError


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
    cos: Tensor  # (max_pos, hd) `functional.rope_tables`
    sin: Tensor  # (max_pos, hd)
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


def _moe_prefix(cfg: ModelConfig, i: int) -> str:
    return f"model.layers.{i}.{'block_sparse_moe' if cfg.is_moe else 'mlp'}"


class _Reader:
    """Reads named tensors from the state, checking presence and shape, and records what it read."""

    def __init__(self, state: Mapping[str, Tensor], quantize: str | None, group_size: int,
                 device: torch.device, dtype: torch.dtype, exact_int8: bool) -> None:
        self.state, self.quantize, self.group_size = state, quantize, group_size
        self.device, self.dtype, self.exact = device, dtype, exact_int8
        self.used: set[str] = set()

    def tensor(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in self.state:
            raise ModelLoadError(f"missing tensor {name}")
        t = self.state[name]
        if tuple(t.shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(t.shape)}, config expects {shape}")
        self.used.add(name)
        return t.detach().to(self.device, self.dtype)

    def weight(self, names: list[str], rows: list[int], cols: int, quantize: bool = True) -> Weight:
        """The matrices `names` ((rows[j], cols) each) stacked by rows, as one Weight."""
        mode = self.quantize if quantize else None
        if all(n in self.state for n in names):  # float: fuse first, then quantize once
            ts = [self.tensor(n, (r, cols)) for n, r in zip(names, rows, strict=True)]
            t = ts[0] if len(ts) == 1 else torch.cat(ts)
            return make_weight(t.float() if mode else t, mode, self.group_size, self.exact)
        parts: list[Weight] = []
        for n, r in zip(names, rows, strict=True):
            try:
                w = read_weight(self.state, n, self.exact)
            except KeyError as e:
                raise ModelLoadError(f"missing tensor {e.args[0]}") from None
            if w is None:
                raise ModelLoadError(f"missing tensor {n}")
            if (w.out_features, w.in_features) != (r, cols):
                raise ModelLoadError(f"tensor {n} stands for a ({w.out_features}, {w.in_features}) "
                                     f"matrix, config expects ({r}, {cols})")
            self.used.update(n + suffix for suffix in w.parts())
            parts.append(w.to(self.device) if not isinstance(w, FloatWeight)
                         else FloatWeight(w.w.to(self.device, self.dtype)))
        try:
            return cat_rows(parts)
        except ValueError as e:
            raise ModelLoadError(f"{names[0]}: {e}") from None


@torch.no_grad()
def build_weights(state: Mapping[str, Tensor], cfg: ModelConfig, quantize: str | None = None,
                  group_size: int = 64, device: torch.device | None = None,
                  dtype: torch.dtype | None = None, exact_int8: bool = False) -> RunnerWeights:
    """Read the tensors named in the table above into the runner's layout (quantizing if asked).

    `state` holds float tensors, or (a quantized artifact) their stored parts; `dtype`
    (default fp32) is that of the float weights; quantized weights compute in fp32.
    Raises ModelLoadError naming a missing, misshaped or unexpected tensor.
    """
    device = device or torch.device("cpu")
    dtype = dtype or torch.float32
    if quantize is not None:
        dtype = torch.float32
    r = _Reader(state, quantize, group_size, device, dtype, exact_int8)
    d, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    h, E = cfg.intermediate_size, cfg.num_local_experts
    layers: list[LayerWeights] = []
    for i in range(cfg.num_hidden_layers):
        a = f"model.layers.{i}.self_attn"
        lw = LayerWeights(
            ln1=r.tensor(f"model.layers.{i}.input_layernorm.weight", (d,)),
            wqkv=r.weight([f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight"],
                          [H * hd, Hkv * hd, Hkv * hd], d),
            wo=r.weight([f"{a}.o_proj.weight"], [d], H * hd),
            ln2=r.tensor(f"model.layers.{i}.post_attention_layernorm.weight", (d,)),
            router=None, w13=[], w2=[],
        )
        p = _moe_prefix(cfg, i)
        if cfg.is_moe:
            lw.router = r.weight([f"{p}.gate.weight"], [E], d, quantize=False)
            ex = f"{p}.experts"
            lw.w13 = [r.weight([f"{ex}.{e}.w1.weight", f"{ex}.{e}.w3.weight"], [h, h], d)
                      for e in range(E)]
            lw.w2 = [r.weight([f"{ex}.{e}.w2.weight"], [d], h) for e in range(E)]
            hs = cfg.shared_expert_intermediate_size
            if hs:
                se = f"{p}.shared_expert"
                lw.shared13 = r.weight([f"{se}.gate_proj.weight", f"{se}.up_proj.weight"], [hs, hs], d)
                lw.shared2 = r.weight([f"{se}.down_proj.weight"], [d], hs)
                lw.shared_gate = r.weight([f"{p}.shared_expert_gate.weight"], [1], d, quantize=False)
            if device.type != "cpu" and all(isinstance(w, FloatWeight) for w in lw.w13 + lw.w2):
                _stack_experts(lw)
        else:
            lw.w13 = [r.weight([f"{p}.gate_proj.weight", f"{p}.up_proj.weight"], [h, h], d)]
            lw.w2 = [r.weight([f"{p}.down_proj.weight"], [d], h)]
        layers.append(lw)
    embed = r.tensor("model.embed_tokens.weight", (cfg.vocab_size, d))
    head = "lm_head.weight"
    if cfg.tie_word_embeddings and not any(k.startswith(head) for k in state):
        lm_head = make_weight(embed.float() if quantize else embed, quantize, group_size, exact_int8)
    else:
        lm_head = r.weight([head], [cfg.vocab_size], d)
    norm = r.tensor("model.norm.weight", (d,))
    unexpected = sorted(set(state) - r.used)
    if unexpected:
        raise ModelLoadError(f"unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    cos, sin = tf.rope_tables(tf.rope_inv_freq(hd, cfg.rope_theta, device),
                              cfg.max_position_embeddings)
    return RunnerWeights(cfg=cfg, embed=embed, layers=layers, norm=norm, lm_head=lm_head,
                         cos=cos.to(dtype), sin=sin.to(dtype), dtype=dtype, quantize=quantize)


def _stack_experts(lw: LayerWeights) -> None:
    """Float experts off the CPU: one (E, ...) stack each for the gather path, the per-expert
    weights views into it (no second copy)."""
    lw.w13_stack = torch.stack([w.w for w in lw.w13 if isinstance(w, FloatWeight)])  # (E, 2h, d)
    lw.w2_stack = torch.stack([w.w for w in lw.w2 if isinstance(w, FloatWeight)])  # (E, d, h)
    lw.w13 = [FloatWeight(lw.w13_stack[e]) for e in range(len(lw.w13))]
    lw.w2 = [FloatWeight(lw.w2_stack[e]) for e in range(len(lw.w2))]


def weights_state_dict(w: RunnerWeights) -> dict[str, Tensor]:
    """The runner's weights back under the names of the table, each in its stored form."""
    cfg = w.cfg
    H, Hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
    out: dict[str, Tensor] = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.norm}

    def put(name: str, weight: Weight) -> None:
        for suffix, t in weight.parts().items():
            out[name + suffix] = t

    def put_rows(names: list[str], weight: Weight, sizes: list[int] | None = None) -> None:
        # a fused matrix back into its parts (halves unless `sizes` says otherwise)
        sizes = sizes or [weight.out_features // 2] * 2
        start = 0
        for name, n in zip(names, sizes, strict=True):
            put(name, weight.rows(start, start + n))
            start += n

    for i, lw in enumerate(w.layers):
        a = f"model.layers.{i}.self_attn"
        out[f"model.layers.{i}.input_layernorm.weight"] = lw.ln1
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = lw.ln2
        put_rows([f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight"], lw.wqkv,
                 [H * hd, Hkv * hd, Hkv * hd])
        put(f"{a}.o_proj.weight", lw.wo)
        p = _moe_prefix(cfg, i)
        if lw.router is None:
            put_rows([f"{p}.gate_proj.weight", f"{p}.up_proj.weight"], lw.w13[0])
            put(f"{p}.down_proj.weight", lw.w2[0])
            continue
        put(f"{p}.gate.weight", lw.router)
        for e, (w13, w2) in enumerate(zip(lw.w13, lw.w2, strict=True)):
            put_rows([f"{p}.experts.{e}.w1.weight", f"{p}.experts.{e}.w3.weight"], w13)
            put(f"{p}.experts.{e}.w2.weight", w2)
        if lw.shared13 is not None and lw.shared2 is not None and lw.shared_gate is not None:
            se = f"{p}.shared_expert"
            put_rows([f"{se}.gate_proj.weight", f"{se}.up_proj.weight"], lw.shared13)
            put(f"{se}.down_proj.weight", lw.shared2)
            put(f"{p}.shared_expert_gate.weight", lw.shared_gate)
    if not cfg.tie_word_embeddings or not isinstance(w.lm_head, FloatWeight):
        put("lm_head.weight", w.lm_head)  # a tied head is stored only when quantized
    return out


__all__ = ["LayerWeights", "RunnerWeights", "build_weights", "weights_state_dict"]
