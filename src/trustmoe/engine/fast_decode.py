"""Decode rows on the CPU through whole-step C kernels: one call per step, no torch ops.

At batch 1 a layer is ~50 small torch ops whose dispatch costs about as much as reading the
weights. `FastDecoder.hidden` runs the one-token chunks of a step (up to
`cpu_kernels.MAX_ROWS` per call) through `tm_decode_step` of `trustmoe/engine/csrc/decode.c`:
for every layer RMSNorm, fused QKV, RoPE, the paged-KV write and attention read in place
through each sequence's slots, the output projection, routing, the selected experts and the
shared expert, then the final norm and LM head, all in one OpenMP region. Weights stay where the runner
keeps them (fp32, int8 or int4), described to C once at start-up. Every output element is
computed the same way whatever rows share the call, so results are batch-invariant.

Used when the runner is on the CPU in fp32 with the kernels built (`FastDecoder.unsupported`
says why not otherwise); prefill chunks keep the torch path. The C code is an accelerated copy
of `trustmoe.model.functional` (the same routing formulation, RoPE tables and combine order
of slots); `tests/engine/test_parity_matrix.py` proves it equal to the model on every option.
"""

from __future__ import annotations

import ctypes
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from trustmoe.engine import cpu_kernels
from trustmoe.engine.cpu_kernels import TmLayer, TmWeight
from trustmoe.engine.kv_cache import PagedKVCache
from trustmoe.engine.quantize import Weight
from trustmoe.engine.weights import RunnerWeights

MAX_EXPERTS = 256  # routing scratch in decode.c
MAX_HEAD_DIM = 512
MAX_GROUP = 64  # query heads per KV head (decode.c attention scratch)


@dataclass
class _Layer:
    ln1: Tensor
    ln2: Tensor
    wqkv: TmWeight
    wo: TmWeight
    router: TmWeight | None
    w13: ctypes.Array[TmWeight]
    w2: ctypes.Array[TmWeight]
    hdim: int
    sh13: TmWeight | None
    sh2: TmWeight | None
    sh_gate: TmWeight | None
    sh_hdim: int

    def c_layer(self, kc: int, vc: int) -> TmLayer:
        """This layer as decode.c's `tm_layer` (it points into this object: keep it alive)."""
        return TmLayer(self.ln1.data_ptr(), self.ln2.data_ptr(), _addr(self.wqkv), _addr(self.wo),
                       _addr(self.router), ctypes.addressof(self.w13), ctypes.addressof(self.w2),
                       self.hdim, _addr(self.sh13), _addr(self.sh2), _addr(self.sh_gate),
                       self.sh_hdim, kc, vc)


def _must(w: Weight) -> TmWeight:
    d = w.c_desc()
    if d is None:
        raise ValueError(f"{type(w).__name__} has no C form")
    return d


def _desc(w: Weight | None) -> TmWeight | None:
    return None if w is None else _must(w)


def _addr(d: TmWeight | None) -> int | None:
    return None if d is None else ctypes.addressof(d)


class FastDecoder:
    @staticmethod
    def unsupported(weights: RunnerWeights, kv: PagedKVCache, device: torch.device) -> str | None:
        """Why the fast path cannot serve this runner (None: it can)."""
        cfg = weights.cfg
        if device.type != "cpu":
            return "not on the CPU"
        if weights.dtype != torch.float32 or kv.k.dtype not in (torch.float32, torch.float16):
            return "not fp32"
        if not cpu_kernels.available():
            return "CPU kernels not built"
        if cfg.num_local_experts > MAX_EXPERTS or cfg.head_size > MAX_HEAD_DIM:
            return "too many experts or too wide heads"
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            return "query heads not a multiple of KV heads"
        if cfg.num_attention_heads // cfg.num_key_value_heads > MAX_GROUP:
            return f"more than {MAX_GROUP} query heads per KV head"
        for lw in weights.layers:
            for w in [lw.wqkv, lw.wo, lw.router, *lw.w13, *lw.w2, lw.shared13, lw.shared2,
                      lw.shared_gate]:
                if w is not None and w.c_desc() is None:
                    return f"a {type(w).__name__} the kernels cannot read"
        return None

    def __init__(self, weights: RunnerWeights, kv: PagedKVCache) -> None:
        self.w, self.kv, self.cfg = weights, kv, weights.cfg
        self.lib = cpu_kernels.lib()
        self.layers: list[_Layer] = []
        for lw in weights.layers:
            w13 = (TmWeight * len(lw.w13))(*[_must(w) for w in lw.w13])
            w2 = (TmWeight * len(lw.w2))(*[_must(w) for w in lw.w2])
            sh13 = _desc(lw.shared13)
            self.layers.append(_Layer(
                ln1=lw.ln1.contiguous(), ln2=lw.ln2.contiguous(), wqkv=_must(lw.wqkv),
                wo=_must(lw.wo), router=_desc(lw.router), w13=w13, w2=w2,
                hdim=lw.w2[0].in_features, sh13=sh13, sh2=_desc(lw.shared2),
                sh_gate=_desc(lw.shared_gate),
                sh_hdim=0 if lw.shared2 is None else lw.shared2.in_features))
        cfg = self.cfg
        self.dims = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.head_size, cfg.num_experts_per_tok)
        self.eps, self.norm_topk = float(cfg.rms_norm_eps), int(cfg.norm_topk_prob)
        self.nslots = kv.k.shape[2]
        self.c_layers = (TmLayer * len(self.layers))(*[
            ly.c_layer(k.data_ptr(), v.data_ptr())
            for ly, k, v in zip(self.layers, kv.k_layers, kv.v_layers, strict=True)])
        self.n_moe = sum(ly.router is not None for ly in self.layers)
        self.kv16 = int(kv.k.dtype == torch.float16)  # an fp16 cache (kv_cache_dtype)
        # RoPE: the C code computes x * cos + roll(x, hd/2) * sin_signed, which equals
        # functional.apply_rope (x * cos + rotate_half(x) * sin) with sin's first half negated
        half = cfg.head_size // 2
        self.cos = weights.cos.contiguous()  # (P, hd)
        self.sin_signed = torch.cat([-weights.sin[:, :half], weights.sin[:, half:]], 1).contiguous()
        self.head = _must(weights.lm_head)
        self.head_p = ctypes.pointer(self.head)
        self.norm = weights.norm.contiguous()
        self.vocab = weights.lm_head.out_features
        self.scratch = torch.empty(self._scratch_floats(cpu_kernels.MAX_ROWS))  # reused by every call

    def _scratch_floats(self, M: int) -> int:
        cfg = self.cfg
        H, Hkv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size, cfg.hidden_size
        attn = M * (d + (H + 2 * Hkv) * hd + H * hd) + 2 * M * max(d, H * hd)
        moe = 0
        for ly in self.layers:
            E = len(ly.w13)
            S = (cfg.num_experts_per_tok if ly.router is not None else 1) + (ly.sh13 is not None)
            hmax = max(ly.hdim, ly.sh_hdim)
            wid = max(d, hmax)
            moe = max(moe, M * d + M * (E + 1) + M * S + M * S * hmax + M * S * d
                      + 2 * M * S * wid + M * S)
        return max(attn, moe, 3 * M * d) + 64

    def hidden(self, tokens: list[int], positions: list[int], slot_lists: list[Tensor],
               routes: list[Tensor] | None = None, logits: bool = False,
               ) -> tuple[Tensor, Tensor | None]:
        """Final hidden states (M, d), before the last norm, of M one-token chunks, and with
        `logits` their (M, V) fp32 logits from the same call (else None). No autograd is
        involved (the runner calls it under inference mode; entering it here again costs ~5%
        of a small model's token).

        tokens[m] sits at positions[m]; slot_lists[m] (positions[m] + 1,) int64 holds the KV
        slots of that sequence's positions 0..positions[m] (the last is the new token's).
        `routes`, when given, receives per MoE layer the (M, k) expert ids the kernel chose
        (for monitoring features).
        """
        M = len(tokens)
        assert 0 < M <= cpu_kernels.MAX_ROWS
        if M == 1:  # views, no gathers
            p = positions[0]
            x = self.w.embed[tokens[0]: tokens[0] + 1].clone()  # (1, d)
            cos, sin = self.cos[p: p + 1], self.sin_signed[p: p + 1]  # (1, hd)
            slots = slot_lists[0]
            offs = torch.tensor([0, slots.shape[0]])
            new_slot = slots[-1:]
            max_len = slots.shape[0]
        else:
            x = self.w.embed[torch.tensor(tokens)]  # (M, d)
            pos = torch.tensor(positions)
            cos, sin = self.cos[pos], self.sin_signed[pos]  # (M, hd)
            slots = torch.cat(slot_lists)
            lens = [s.shape[0] for s in slot_lists]
            ends = list(itertools.accumulate(lens))
            offs = torch.tensor([0, *ends])  # (M + 1,)
            new_slot = slots[torch.tensor(ends) - 1]  # (M,)
            max_len = max(lens)
        assert slots.dtype == torch.long and slots.is_contiguous()
        d, H, Hkv, hd, k = self.dims
        ids = torch.empty(self.n_moe, M, k, dtype=torch.int32) if routes is not None else None
        out = torch.empty(M, self.vocab) if logits else None
        self.lib.tm_decode_step(
            x.data_ptr(), M, d, self.eps, self.c_layers, len(self.layers), cos.data_ptr(),
            sin.data_ptr(), self.nslots, new_slot.data_ptr(), slots.data_ptr(), offs.data_ptr(),
            H, Hkv, hd, self.cfg.num_local_experts, k, self.norm_topk, self.scratch.data_ptr(),
            max_len, None if ids is None else ids.data_ptr(), self.norm.data_ptr(), self.head_p,
            None if out is None else out.data_ptr(), self.kv16)
        if routes is not None and ids is not None:
            routes.extend(t.long() for t in ids)  # per MoE layer (M, k)
        return x, out

    def logits(self, x: Tensor) -> Tensor:
        """(M, V) fp32 logits of hidden states x (M, d): final RMSNorm, then the LM head."""
        M = x.shape[0]
        out = torch.empty(M, self.vocab)
        self.lib.tm_final(x.data_ptr(), M, self.dims[0], self.norm.data_ptr(), self.eps,
                          self.head_p, self.scratch.data_ptr(), out.data_ptr())
        return out


__all__ = ["FastDecoder"]
