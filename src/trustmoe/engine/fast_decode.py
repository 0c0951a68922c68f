"""Decode rows on the CPU through whole-block C kernels: two calls per layer, no torch ops.

At batch 1 a layer is ~50 small torch ops whose dispatch costs about as much as reading the
weights. `FastDecoder.hidden` runs the one-token chunks of a step (up to
`cpu_kernels.MAX_ROWS` per call) through `tm_attn_block` and `tm_moe_block` of
`trustmoe/model/csrc/decode.c`: RMSNorm, fused QKV, RoPE, the paged-KV write and attention
read in place through each sequence's slots, the output projection, routing, the selected
experts and the shared expert, each block in one OpenMP region. Weights stay where the runner
keeps them (fp32, int8 or int4), described to C once at start-up. Every output element is
computed the same way whatever rows share the call, so results are batch-invariant.

Used when the runner is on the CPU in fp32 with the kernels built (`FastDecoder.unsupported`
says why not otherwise); prefill chunks keep the torch path.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
from torch import Tensor

from trustmoe.engine.kv_cache import PagedKVCache
from trustmoe.model import cpu_kernels
from trustmoe.model.cpu_kernels import TmWeight
from trustmoe.model.quantize import Weight

MAX_EXPERTS = 256  # routing scratch in decode.c
MAX_HEAD_DIM = 512


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


def _must(w: Weight) -> TmWeight:
    d = w.c_desc()
    if d is None:
        raise ValueError(f"{type(w).__name__} has no C form")
    return d


def _desc(w: Weight | None) -> TmWeight | None:
    return None if w is None else _must(w)


def _ref(d: TmWeight | None) -> ctypes._Pointer[TmWeight] | None:
    return None if d is None else ctypes.pointer(d)


class FastDecoder:
    @staticmethod
    def unsupported(weights: object, kv: PagedKVCache, device: torch.device) -> str | None:
        """Why the fast path cannot serve this runner (None: it can)."""
        from trustmoe.engine.runner import RunnerWeights

        assert isinstance(weights, RunnerWeights)
        cfg = weights.cfg
        if device.type != "cpu":
            return "not on the CPU"
        if weights.dtype != torch.float32 or kv.k.dtype != torch.float32:
            return "not fp32"
        if not cpu_kernels.available():
            return "CPU kernels not built"
        if cfg.num_local_experts > MAX_EXPERTS or cfg.head_size > MAX_HEAD_DIM:
            return "too many experts or too wide heads"
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            return "query heads not a multiple of KV heads"
        for lw in weights.layers:
            for w in [lw.wqkv, lw.wo, lw.router, *lw.w13, *lw.w2, lw.shared13, lw.shared2,
                      lw.shared_gate]:
                if w is not None and w.c_desc() is None:
                    return f"a {type(w).__name__} the kernels cannot read"
        return None

    def __init__(self, weights: object, kv: PagedKVCache) -> None:
        from trustmoe.engine.runner import RunnerWeights

        assert isinstance(weights, RunnerWeights)
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

    def _scratch_floats(self, M: int, max_slots: int) -> int:
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
        return max(attn, moe) + 64

    @torch.inference_mode()
    def hidden(self, tokens: list[int], positions: list[int], slot_lists: list[Tensor]) -> Tensor:
        """Final hidden states (M, d), before the last norm, of M one-token chunks.

        tokens[m] sits at positions[m]; slot_lists[m] (positions[m] + 1,) int64 holds the KV
        slots of that sequence's positions 0..positions[m] (the last is the new token's).
        """
        M = len(tokens)
        assert 0 < M <= cpu_kernels.MAX_ROWS
        cfg = self.cfg
        d, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        x = self.w.embed[torch.tensor(tokens)].contiguous()  # (M, d)
        pos = torch.tensor(positions)
        cos, sin = self.w.cos[pos].contiguous(), self.w.sin[pos].contiguous()  # (M, hd)
        slots = (torch.cat(slot_lists) if M > 1 else slot_lists[0]).to(torch.long).contiguous()
        lens = [s.shape[0] for s in slot_lists]
        offs = torch.tensor([0, *lens], dtype=torch.long).cumsum_(0)  # (M + 1,)
        new_slot = offs[1:] - 1
        new_slot = slots[new_slot].contiguous()  # (M,)
        scratch = torch.empty(self._scratch_floats(M, max(lens)))
        nslots = self.kv.k.shape[2]
        eps = float(cfg.rms_norm_eps)
        lib = self.lib
        for i, ly in enumerate(self.layers):
            lib.tm_attn_block(
                x.data_ptr(), M, d, ly.ln1.data_ptr(), eps, ctypes.byref(ly.wqkv), ctypes.byref(ly.wo),
                cos.data_ptr(), sin.data_ptr(), self.kv.k_layers[i].data_ptr(),
                self.kv.v_layers[i].data_ptr(), nslots, new_slot.data_ptr(), slots.data_ptr(),
                offs.data_ptr(), H, Hkv, hd, scratch.data_ptr(), max(lens))
            lib.tm_moe_block(
                x.data_ptr(), M, d, ly.ln2.data_ptr(), eps, _ref(ly.router), len(ly.w13),
                cfg.num_experts_per_tok, int(cfg.norm_topk_prob), ly.w13, ly.w2, ly.hdim,
                _ref(ly.sh13), _ref(ly.sh2), _ref(ly.sh_gate), ly.sh_hdim, scratch.data_ptr())
        return x


__all__ = ["FastDecoder"]
