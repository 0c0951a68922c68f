"""The engine's forward pass over one flat batch of sequence chunks with a paged KV cache.

The runner works on `RunnerWeights` (read by name, see `weights.py`): fused QKV, fused
gate+up per expert, every matrix a `Weight` (fp, int8 or int4, see `trustmoe.engine.quantize`).
Every piece of maths — RMSNorm, RoPE, attention, routing, SwiGLU, the expert combine, the
shared-expert gate — is `trustmoe.model.functional`'s, the same functions the training model
calls; this module only batches and groups them. One call to `forward` runs every scheduled
chunk (a prefill piece or one decode token per sequence) as a single batch: linears over all
rows, attention per sequence over its own blocks, MoE per row group. Inference is dropless:
there is no capacity factor here (it is a training-only option of the model).

Batch invariance: GEMM libraries pick different code paths (and so round differently) for
different row counts. With `batch_invariant=True` every matmul is run per *row group*. Decode
rows are packed into groups of at most `G` rows, where `G` is probed at start-up as the largest
row count whose results equal the one-row results bit for bit: 16 on CPU with the compiled
few-row kernels (`trustmoe.engine.cpu_kernels`, invariant by construction), 3 with MKL alone on
AVX2. Prefill rows go through the compiled blocked GEMM (`Weight.gemm`), whose every output is
one FMA chain over k in order at any row count: all prefill chunks of a step form one group,
and each expert takes all its rows of the step at once. Without the compiled kernels a prefill
chunk is its own group (its shape does not depend on the other sequences) and experts run in
zero-padded blocks of a probed fixed size. So a request's logits are the same bits alone or in
any batch.

MoE paths: `sorted` (prefill and CPU decode; tokens grouped by expert, experts read in place),
`gather` (decode on CUDA: gather the selected experts' stacked weights, as gpt-fast does, so
shapes never depend on the routing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from trustmoe.engine import cpu_kernels
from trustmoe.engine.arena import pack_weights
from trustmoe.engine.fast_decode import FastDecoder
from trustmoe.engine.features import FeatureAccumulator
from trustmoe.engine.invariance import blocked_mm, probe_block_rows, probe_invariant_rows
from trustmoe.engine.kv_cache import PagedKVCache
from trustmoe.engine.quantize import FloatWeight, Weight
from trustmoe.engine.weights import LayerWeights, RunnerWeights
from trustmoe.model import functional as tf

GATHER_MAX_ROWS = 8  # decode-sized row groups take the gather path when it is on


@dataclass
class Group:
    """Rows that share one matmul; `gemm`: through `Weight.gemm` (invariant at any count)."""

    rows: slice
    gemm: bool = False


@dataclass
class Chunk:
    """One sequence's slice of a step: tokens at positions start..start+T-1."""

    tokens: list[int]
    start: int
    slots: Tensor  # (start + T,) KV slots of positions 0..start+T-1
    logits: str = "last"  # "last" | "all" | "none"
    rows: slice = field(default_factory=lambda: slice(0, 0))
    first_slot: int | None = None  # set when slots are one contiguous run (no gather needed)
    features: FeatureAccumulator | None = None  # prefill chunk of a request whose features are kept
    skip: int = 0  # with logits="all": leading rows whose logits are not wanted


class ModelRunner:
    def __init__(self, weights: RunnerWeights, kv: PagedKVCache, device: torch.device,
                 batch_invariant: bool = True, moe_path: str = "auto", fast_decode: bool = True) -> None:
        self.w, self.kv, self.device = weights, kv, device
        cfg = weights.cfg
        self.cfg = cfg
        self.H, self.Hkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        self.batch_invariant = batch_invariant
        probe_rows = cpu_kernels.MAX_ROWS if device.type == "cpu" and cpu_kernels.available() else 8
        self.group_rows = probe_invariant_rows(weights.all_weights(), weights.dtype, device,
                                               probe_rows) if batch_invariant else 1 << 30
        if moe_path == "auto":
            moe_path = "gather" if device.type == "cuda" and weights.quantize is None else "sorted"
        if moe_path == "gather" and weights.layers and weights.layers[0].router is not None \
                and weights.layers[0].w13_stack is None:
            for lw in weights.layers:  # stack float expert weights for the gather path
                lw.w13_stack = torch.stack([w.dequantize() for w in lw.w13]).to(device, weights.dtype)
                lw.w2_stack = torch.stack([w.dequantize() for w in lw.w2]).to(device, weights.dtype)
        self.moe_path = moe_path
        # prefill rows through the compiled GEMM (invariant at any row count): every weight
        # must have a C form; then one group for all prefill rows of a step
        self.gemm_rows = device.type == "cpu" and cpu_kernels.available() and all(
            w.c_desc() is not None for w in [*weights.all_weights(), weights.lm_head])
        # batch-invariant prefill with MoE over all rows of a step at once (one read of each
        # expert per step instead of one per prompt): through the GEMM, else (CPU float
        # experts) fixed-shape blocked GEMMs
        self.moe_block_rows: int | None = None
        experts = [w for lw in weights.layers if lw.router is not None for w in lw.w13 + lw.w2]
        if batch_invariant and not self.gemm_rows and device.type == "cpu" and experts \
                and all(isinstance(w, FloatWeight) for w in experts):
            self.moe_block_rows = probe_block_rows(experts, weights.dtype, device)
        why = FastDecoder.unsupported(weights, kv, device) if fast_decode else "switched off"
        self._arena = pack_weights(weights) if why is None else None  # before the C descriptors
        self.fast = FastDecoder(weights, kv) if why is None else None
        self.k4 = [kv.k[i].unsqueeze(0) for i in range(kv.k.shape[0])]  # (1, Hkv, slots, hd)
        self._routes: list[Tensor] | None = None  # per MoE layer (N, k) ids, when features are fed
        self.v4 = [kv.v[i].unsqueeze(0) for i in range(kv.v.shape[0])]

    # ------------------------------------------------------------ helpers

    def _groups(self, chunks: list[Chunk]) -> list[Group]:
        n = sum(len(c.tokens) for c in chunks)
        if not self.batch_invariant:
            return [Group(slice(0, n))]
        groups: list[Group] = []
        kind, start, size = "", 0, 0  # the open run: "rows" (decode) or "gemm" (prefill)
        for c in chunks:
            k = "rows" if len(c.tokens) == 1 else "gemm" if self.gemm_rows else "alone"
            if size and (k != kind or (k == "rows" and size == self.group_rows)):
                groups.append(Group(slice(start, start + size), kind == "gemm"))
                size = 0
            if k == "alone":  # a prefill chunk in its own group
                groups.append(Group(c.rows))
                continue
            if size == 0:
                kind, start = k, c.rows.start
            size += len(c.tokens)
        if size:
            groups.append(Group(slice(start, start + size), kind == "gemm"))
        return groups

    def _lin(self, x: Tensor, w: Weight, groups: list[Group]) -> Tensor:
        # x: (N, K) -> (N, N_out)
        outs = []
        for g in groups:
            xg = x if len(groups) == 1 else x[g.rows]
            y = w.gemm(xg) if g.gemm else None
            outs.append(w.mm(xg) if y is None else y)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # ------------------------------------------------------------ forward

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> list[Tensor | None]:
        """Run all chunks; return per chunk its requested logits (rows, V) fp32 or None."""
        if self.fast is None or not any(len(c.tokens) == 1 for c in chunks):
            return self._forward_torch(chunks)
        out: list[Tensor | None] = [None] * len(chunks)
        dec = [i for i, c in enumerate(chunks) if len(c.tokens) == 1]
        rest = [i for i, c in enumerate(chunks) if len(c.tokens) != 1]
        if rest:
            for i, lg in zip(rest, self._forward_torch([chunks[i] for i in rest]), strict=True):
                out[i] = lg
        step = cpu_kernels.MAX_ROWS
        for a in range(0, len(dec), step):  # decode rows in groups the kernels take at once
            part = [chunks[i] for i in dec[a: a + step]]
            routes: list[Tensor] | None = [] if any(c.features for c in part) else None
            want = [j for j, c in enumerate(part) if c.logits != "none"]  # one row each
            every = len(want) == len(part)  # the usual case: logits from the same call
            x, lg = self.fast.hidden([c.tokens[0] for c in part], [c.start for c in part],
                                     [c.slots for c in part], routes, logits=every)  # (B, d)
            if routes is not None:  # one-token prefill chunks of monitored requests
                self._feed(part, x, routes)
            if want and lg is None:
                lg = self.fast.logits(x[want])  # (len(want), V)
            if lg is not None:
                for r, j in enumerate(want):
                    out[dec[a + j]] = lg[r: r + 1]
        return out

    def _forward_torch(self, chunks: list[Chunk]) -> list[Tensor | None]:
        off = 0
        for c in chunks:
            c.rows = slice(off, off + len(c.tokens))
            off += len(c.tokens)
        dev = self.device
        tok = torch.tensor([t for c in chunks for t in c.tokens], dtype=torch.long, device=dev)
        if len(chunks) == 1:
            c0 = chunks[0]
            new_slots = c0.slots[c0.start:]  # (N,)
            cos = self.w.cos[c0.start: c0.start + len(c0.tokens)]  # (N, hd)
            sin = self.w.sin[c0.start: c0.start + len(c0.tokens)]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (N, 1, hd)
        else:
            pos = torch.cat([torch.arange(c.start, c.start + len(c.tokens)) for c in chunks])
            pos = pos.to(dev)
            new_slots = torch.cat([c.slots[c.start:] for c in chunks])  # (N,)
            cos, sin = self.w.cos[pos].unsqueeze(1), self.w.sin[pos].unsqueeze(1)  # (N, 1, hd)
        groups = self._groups(chunks)
        masks = [tf.causal_mask(c.start, len(c.tokens), dev) for c in chunks]  # (T, S) or None
        x = self.w.embed[tok]  # (N, d)
        self._routes = [] if any(c.features for c in chunks) else None
        for i, lw in enumerate(self.w.layers):
            x = x + self._attention(i, lw, x, cos, sin, chunks, new_slots, masks, groups)
            h = tf.rms_norm(x, lw.ln2, self.cfg.rms_norm_eps)
            x = x + self._mlp(lw, h, groups)
        if self._routes is not None:
            self._feed(chunks, x, self._routes)
            self._routes = None
        return self._logits(x, chunks)

    def _feed(self, chunks: list[Chunk], x: Tensor, routes: list[Tensor]) -> None:
        """Monitoring features from this step's own tensors: x (N, d) final hidden states
        before the last norm (rows in chunk order), routes: per MoE layer (N, k) expert ids."""
        off = 0
        for c in chunks:
            T = len(c.tokens)
            rows = slice(off, off + T)
            off += T
            acc = c.features
            if acc is None:
                continue
            hn = tf.rms_norm(x[rows], self.w.norm, self.cfg.rms_norm_eps)  # (T, d)
            acc.add_hidden(hn)
            for layer, ids in enumerate(routes):
                acc.add_routing(layer, ids[rows])
            pos = acc.scored_in(c.start, c.start + T)  # (m,) at most MAX_SCORED per request
            if len(pos):
                h = hn[torch.as_tensor(pos - c.start, device=hn.device)]  # (m, d)
                acc.add_logits(pos, self.w.lm_head.mm(h).float())  # (m, V)

    def _attention(self, layer: int, lw: LayerWeights, x: Tensor, cos: Tensor, sin: Tensor,
                   chunks: list[Chunk], new_slots: Tensor, masks: list[Tensor | None],
                   groups: list[Group]) -> Tensor:
        N = x.shape[0]
        H, Hkv, hd = self.H, self.Hkv, self.hd
        h = tf.rms_norm(x, lw.ln1, self.cfg.rms_norm_eps)
        qkv = self._lin(h, lw.wqkv, groups)  # (N, (H + 2Hkv) * hd)
        qk = qkv.narrow(1, 0, (H + Hkv) * hd).view(N, H + Hkv, hd)  # RoPE on q and k at once
        qk = tf.apply_rope(qk, cos, sin)  # cos, sin: (N, 1, hd)
        q, k = qk.narrow(1, 0, H), qk.narrow(1, H, Hkv)  # (N, H, hd), (N, Hkv, hd)
        v = qkv.narrow(1, (H + Hkv) * hd, Hkv * hd).view(N, Hkv, hd)
        self.kv.write(layer, new_slots, k.transpose(0, 1), v.transpose(0, 1))
        outs = []
        for ch, mask in zip(chunks, masks, strict=True):
            if ch.first_slot is not None:  # one contiguous run of slots: a view, no copy
                S = ch.slots.shape[0]
                kk = self.k4[layer].narrow(2, ch.first_slot, S)  # (1, Hkv, S, hd)
                vv = self.v4[layer].narrow(2, ch.first_slot, S)
            else:
                k3, v3 = self.kv.read(layer, ch.slots)  # (Hkv, S, hd)
                kk, vv = k3.unsqueeze(0), v3.unsqueeze(0)
            if kk.dtype != q.dtype:  # a float16 cache: attend in the compute dtype
                kk, vv = kk.to(q.dtype), vv.to(q.dtype)
            qq = (q if len(chunks) == 1 else q[ch.rows]).transpose(0, 1).unsqueeze(0)
            y = tf.attention(qq, kk, vv, mask)  # (1, H, T, hd)
            outs.append(y.transpose(1, 2).reshape(-1, H * hd))  # (T, H*hd)
        att = outs[0] if len(outs) == 1 else torch.cat(outs)  # (N, H*hd)
        return self._lin(att, lw.wo, groups)

    def _mlp(self, lw: LayerWeights, h: Tensor, groups: list[Group]) -> Tensor:
        # h: (N, d) -> (N, d)
        if lw.router is None:
            return self._lin(tf.swiglu_packed(self._lin(h, lw.w13[0], groups)), lw.w2[0], groups)
        logits = self._lin(h, lw.router, groups)  # (N, E)
        _, wts, ids = tf.route(logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob)
        if self._routes is not None:
            self._routes.append(ids)  # (N, k), kept for monitoring features
        if wts.dtype != h.dtype:
            wts = wts.to(h.dtype)
        if self.batch_invariant and (self.gemm_rows or self.moe_block_rows):
            # all rows at once: each expert's weights read once per step
            y = self._moe_sorted(lw, h, wts, ids, self.moe_block_rows, gemm=self.gemm_rows)
        else:
            parts = [self._moe_gather(lw, h[g.rows], wts[g.rows], ids[g.rows])
                     if self.moe_path == "gather" and g.rows.stop - g.rows.start <= GATHER_MAX_ROWS
                     else self._moe_sorted(lw, h[g.rows], wts[g.rows], ids[g.rows]) for g in groups]
            y = parts[0] if len(parts) == 1 else torch.cat(parts)
        if lw.shared13 is not None and lw.shared2 is not None and lw.shared_gate is not None:
            shared = self._lin(tf.swiglu_packed(self._lin(h, lw.shared13, groups)), lw.shared2, groups)
            y = y + tf.gate_shared(self._lin(h, lw.shared_gate, groups), shared)  # gate: (N, 1)
        return y

    def _moe_sorted(self, lw: LayerWeights, x: Tensor, wts: Tensor, ids: Tensor,
                    block: int | None = None, gemm: bool = False) -> Tensor:
        # x: (n, d); wts, ids: (n, k) -> (n, d); experts read in place, one matmul per expert
        # (gemm: through Weight.gemm, invariant at any row count; else block: in zero-padded
        # blocks of exactly `block` rows)
        n, k = ids.shape
        if n == 1 and block is None and not gemm:  # one token: its k experts in slot order
            outs = [lw.w2[e].mm(tf.swiglu_packed(lw.w13[e].mm(x))) for e in ids.tolist()[0]]
            return tf.moe_combine(torch.stack(outs, dim=1), wts)  # (1, k, d) -> (1, d)
        flat = ids.flatten()  # (n*k,)
        order = torch.argsort(flat, stable=True)  # (n*k,) assignments grouped by expert
        counts = torch.bincount(flat, minlength=len(lw.w13)).tolist()
        xs = x[order // k]  # (n*k, d)
        ys = torch.empty_like(xs)
        start = 0
        for e, cnt in enumerate(counts):
            if cnt:
                seg = slice(start, start + cnt)
                if gemm:
                    act = tf.swiglu_packed(_gemm(lw.w13[e], xs[seg]))
                    ys[seg] = _gemm(lw.w2[e], act)
                elif block:
                    act = tf.swiglu_packed(blocked_mm(lw.w13[e], xs[seg], block))
                    ys[seg] = blocked_mm(lw.w2[e], act, block)
                else:
                    ys[seg] = lw.w2[e].mm(tf.swiglu_packed(lw.w13[e].mm(xs[seg])))
                start += cnt
        per_slot = torch.empty_like(ys)
        per_slot[order] = ys  # (n*k, d) back in (token, slot) order
        return tf.moe_combine(per_slot.view(n, k, -1), wts)

    def _moe_gather(self, lw: LayerWeights, x: Tensor, wts: Tensor, ids: Tensor) -> Tensor:
        # gpt-fast style: gather the selected experts' weights; no data-dependent shapes
        assert lw.w13_stack is not None and lw.w2_stack is not None
        w13 = lw.w13_stack[ids]  # (n, k, 2h, d)
        w2 = lw.w2_stack[ids]  # (n, k, d, h)
        gu = torch.einsum("nd,nkhd->nkh", x, w13)  # (n, k, 2h)
        act = tf.swiglu_packed(gu)  # (n, k, h)
        ys = torch.einsum("nkh,nkdh->nkd", act, w2)  # (n, k, d)
        return tf.moe_combine(ys, wts)

    def _logits(self, x: Tensor, chunks: list[Chunk]) -> list[Tensor | None]:
        sel: list[Tensor] = []
        spans: list[tuple[int, int] | None] = []
        n = 0
        for c in chunks:
            if c.logits == "none":
                spans.append(None)
                continue
            rows = x[c.rows.start + c.skip: c.rows.stop] if c.logits == "all" \
                else x[c.rows.stop - 1: c.rows.stop]
            sel.append(rows)
            spans.append((n, n + rows.shape[0]))
            n += rows.shape[0]
        if not sel:
            return [None] * len(chunks)
        h = torch.cat(sel)
        h = tf.rms_norm(h, self.w.norm, self.cfg.rms_norm_eps)
        if self.batch_invariant:  # each chunk's rows alone, single rows packed by G
            sizes = [b - a for a, b in (s for s in spans if s)]
            fake = [Chunk([0] * m, 0, torch.empty(0)) for m in sizes]
            o = 0
            for f in fake:
                f.rows = slice(o, o + len(f.tokens))
                o += len(f.tokens)
            groups = self._groups(fake)
        else:
            groups = [Group(slice(0, n))]
        logits = self._lin(h, self.w.lm_head, groups).float()  # (n, V)
        return [None if s is None else logits[s[0]: s[1]] for s in spans]


def _gemm(w: Weight, x: Tensor) -> Tensor:
    y = w.gemm(x)  # (n, N); the runner checked at start-up that every weight has a C form
    assert y is not None
    return y


__all__ = ["Chunk", "Group", "ModelRunner"]
