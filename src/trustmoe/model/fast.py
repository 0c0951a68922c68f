"""Training fast path: a chunked, fused lm_head + cross-entropy and the switch that turns it on.

`optimize_for_training(model)` is what the trainer calls once after building (or loading) the
model. It changes no numerics beyond fp32 round-off and no parameter names, so checkpoints,
Hugging Face export and `trustmoe.load` are unaffected. (The MoE expert fast path in `moe.py`
is always on; it needs no switch.)

The fused loss computes, chunk by chunk of rows, logits -> log-sum-exp -> loss and, in the same
pass while the chunk is still in cache, the gradients w.r.t. the hidden states and the lm_head
weight (softmax - one_hot). Backward then only scales them. That removes the separate
log_softmax / log_softmax_backward passes over the full (N, V) logits and their fp32 copies.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_BYTES = 16 * 2**20  # one (rows, V) fp32 work buffer stays in L3


class FusedLossModel(Protocol):
    """What the switch needs of a model (the `Transformer` is one): its flag and device."""

    fused_loss: bool

    @property
    def device(self) -> torch.device: ...


M = TypeVar("M", bound=FusedLossModel)


def optimize_for_training(model: M) -> M:
    """Switch `model` to the fused loss (in place), tune the CPU allocator, and return it.

    The returned object is the same module, so saving, checkpointing, `load_state_dict` and
    `model.run(...)` keep working unchanged. (torch.compile of the attention half was tried:
    ~45 s to compile on 2 cores and no measurable gain, so it is not offered.)
    """
    model.fused_loss = True
    if model.device.type == "cpu":
        configure_cpu_allocator()
    return model


def configure_cpu_allocator() -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS.

    A training step allocates and frees tens of MB of activations; by default glibc serves
    blocks over 32 MiB with fresh mmap()s, so every step pays ~30-50k page faults (kernel page
    zeroing) — measured at 5-10% of a bench-small step here. Process-wide and idempotent
    (PyTorch's CPU tuning guide suggests jemalloc/tcmalloc for the same reason); the cost is
    that the process keeps its peak heap. Returns False where glibc's mallopt is unavailable.
    """
    global _ALLOCATOR_DONE
    if _ALLOCATOR_DONE:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
        ok = libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1 and ok
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_DONE = ok
    return ok


_ALLOCATOR_DONE = False


def fused_loss_supported(x: Tensor, weight: Tensor) -> bool:
    """fp32 and no autocast: the only case the fused kernel handles (others use the plain path)."""
    dev = x.device.type
    return (
        x.dtype == torch.float32 and weight.dtype == torch.float32
        and not torch.is_autocast_enabled(dev)
    )


def linear_cross_entropy(
    x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy of `x @ weight.T` against `targets`, without a separate softmax pass.

    x: (N, d) fp32, weight: (V, d) fp32, targets: (N,) int64 -> (loss scalar, logits (N, V)).
    Equals `F.cross_entropy(x @ weight.T, targets, ignore_index=ignore_index)` (and its
    gradients) up to fp32 round-off. The returned logits carry no gradient.
    """
    loss, logits = _LinearCrossEntropy.apply(x, weight, targets, ignore_index)
    return loss, logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int
    ) -> tuple[Tensor, Tensor]:
        N, V = x.shape[0], weight.shape[0]
        valid = targets != ignore_index  # (N,)
        n_valid = int(valid.sum())
        safe = torch.where(valid, targets, 0)  # (N,) in-range ids for gather
        need_x, need_w = ctx.needs_input_grad[:2]
        need_grad = (need_x or need_w) and n_valid > 0
        logits = x.new_empty(N, V)  # (N, V)
        gx = torch.empty_like(x) if need_x else None  # (N, d)
        gw = torch.zeros_like(weight) if need_w else None  # (V, d)
        rows = max(16, CHUNK_BYTES // (4 * V))
        work = x.new_empty(min(rows, N), V)  # (c, V) reused per chunk
        losses = x.new_empty(N)  # (N,) per-row loss, 0 where ignored
        wt = weight.t()  # (d, V)
        for s in range(0, N, rows):
            e = min(N, s + rows)
            xc, lg, buf = x[s:e], logits[s:e], work[: e - s]
            torch.mm(xc, wt, out=lg)  # (c, V)
            m = lg.amax(dim=-1, keepdim=True)  # (c, 1)
            torch.sub(lg, m, out=buf).exp_()  # (c, V) exp(l - max)
            sumexp = buf.sum(dim=-1, keepdim=True)  # (c, 1)
            lse = m + sumexp.log()  # (c, 1)
            picked = lg.gather(1, safe[s:e, None])  # (c, 1)
            losses[s:e] = ((lse - picked) * valid[s:e, None]).squeeze(1)
            if not need_grad:
                continue
            # d loss / d logits = (softmax - one_hot) / n_valid on valid rows, 0 elsewhere
            scale = valid[s:e, None].to(x.dtype) / n_valid  # (c, 1)
            buf.mul_(scale / sumexp)
            buf.scatter_add_(1, safe[s:e, None], -scale)
            if gx is not None:
                torch.mm(buf, weight, out=gx[s:e])  # (c, d)
            if gw is not None:
                gw.addmm_(buf.t(), xc)  # (V, d)
        loss = losses.sum() / n_valid if n_valid else losses.sum() * float("nan")
        ctx.mark_non_differentiable(logits)
        ctx.save_for_backward(*(t for t in (gx, gw) if t is not None))
        ctx.has = (gx is not None, gw is not None, need_grad)
        return loss, logits

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_loss: Tensor, _g_logits: Tensor | None) -> tuple[Tensor | None, ...]:
        has_x, has_w, need_grad = ctx.has
        saved = list(ctx.saved_tensors)
        gx = saved.pop(0) if has_x else None
        gw = saved.pop(0) if has_w else None
        if not need_grad:  # every target ignored: F.cross_entropy gives nan; grads are zero
            gx = None if gx is None else torch.zeros_like(gx)
            gw = None if gw is None else torch.zeros_like(gw)
        elif float(g_loss) != 1.0:
            gx = None if gx is None else gx * g_loss
            gw = None if gw is None else gw * g_loss
        return gx, gw, None, None


def cross_entropy(
    x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, fused: bool
) -> tuple[Tensor, Tensor]:
    """x: (N, d), weight: (V, d), targets: (N,) -> (mean CE, logits (N, V)); the model's one call."""
    if fused and fused_loss_supported(x, weight):
        return linear_cross_entropy(x, weight, targets, ignore_index)
    logits = F.linear(x, weight)  # (N, V)
    ce = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)
    return ce, logits
