"""Differentially private training (DP-SGD): per-sample gradients, clipping, noise, accounting.

    windows ──Poisson(q)──► batch ──vmap(grad)──► per-sample grads (B, *p) ──clip to C──► sum
            + N(0, σ²C²) ──÷ q·N──► p.grad ──► optimizer (AdamW: post-processing, no extra cost)

The unit of privacy is one training *window*: the train split is cut into N disjoint windows
of `seq_len + 1` tokens, and every step takes each window independently with probability
q = expected batch / N (Poisson subsampling, as Opacus's DPDataLoader does), so the
accountant's assumptions hold exactly. A secret repeated in k windows is covered by group
privacy (ε grows roughly k-fold), which is why canary exposure still falls but does not
vanish for often-repeated secrets.

Per-sample gradients come from `torch.func` (functional_call + vmap + grad) for every
parameter: embeddings, attention, norms, the router and the stacked experts. The MoE's sorted
expert path (a custom autograd function with data-dependent shapes) cannot be vmapped, so
inside the per-sample computation each MoE layer runs `dense_moe_forward`: every expert on
every token, combined with the router's renormalised top-k weights. It computes the same
function (tested equal to the sorted path, values and per-example gradients), at E/k times the
expert FLOPs. The noise multiplier σ is calibrated, and the ε spent reported, by Opacus's RDP
(default) or PRV accountant.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trustmoe.io import TrustmoeError
from trustmoe.model.moe import MoE, RouterOutput
from trustmoe.model.transformer import Transformer

ACCOUNTANTS = ("rdp", "prv")


@dataclass(frozen=True)
class DPConfig:
    epsilon: float  # target ε for the whole schedule
    delta: float = 1e-5
    max_grad_norm: float = 1.0  # C: per-sample L2 clipping bound
    accountant: str = "rdp"
    chunk: int = 16  # samples per vmap call (memory bound; no effect on results)

    def validate(self) -> DPConfig:
        if not (isinstance(self.epsilon, int | float) and math.isfinite(self.epsilon)
                and self.epsilon > 0):
            raise TrustmoeError(f"--dp-epsilon must be a positive finite number, got {self.epsilon}")
        if not (isinstance(self.delta, int | float) and 0 < self.delta < 1):
            raise TrustmoeError(f"--dp-delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise TrustmoeError(f"--max-grad-norm must be positive, got {self.max_grad_norm}")
        if self.accountant not in ACCOUNTANTS:
            raise TrustmoeError(f"DP accountant must be one of {', '.join(ACCOUNTANTS)}, "
                                f"not {self.accountant!r}")
        if self.chunk < 1:
            raise TrustmoeError(f"DP chunk must be >= 1, got {self.chunk}")
        return self


def _opacus() -> Any:
    try:
        import opacus.accountants as acc
    except ImportError:  # pragma: no cover - depends on the install
        raise TrustmoeError("differentially private training needs Opacus's accountant: "
                            "pip install 'trustmoe[dp]'") from None
    return acc


def calibrate_noise(cfg: DPConfig, sample_rate: float, steps: int) -> float:
    """σ such that `steps` Poisson-subsampled Gaussian steps at rate q spend cfg.epsilon."""
    acc = _opacus()
    from opacus.accountants.utils import get_noise_multiplier

    del acc
    try:
        return float(get_noise_multiplier(target_epsilon=cfg.epsilon, target_delta=cfg.delta,
                                          sample_rate=sample_rate, steps=steps,
                                          accountant=cfg.accountant, epsilon_tolerance=0.005))
    except ValueError as e:
        raise TrustmoeError(f"cannot reach ε={cfg.epsilon} at δ={cfg.delta} with sampling rate "
                            f"{sample_rate:.4g} over {steps} steps ({e})") from None


def spent_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """ε spent after `steps` steps (0 before the first), from a fresh Opacus accountant."""
    if steps <= 0:
        return 0.0
    acc = _opacus()
    a = acc.RDPAccountant() if accountant == "rdp" else acc.PRVAccountant()
    a.history = [(noise_multiplier, sample_rate, steps)]
    return float(a.get_epsilon(delta=delta))


# --------------------------------------------------------------------------- per-sample grads

def dense_moe_forward(self: MoE, x: Tensor) -> tuple[Tensor, RouterOutput]:
    """The MoE layer's function with every expert on every token (vmap-able; no sorting).

    x: (B, T, d) -> (B, T, d). Same routing (fp32 softmax, top-k, renormalisation) and the
    same combine as `MoE.forward`; counts are float so that no data-dependent shape appears.
    """
    if self.capacity_factor is not None:
        raise TrustmoeError("DP training needs a dropless MoE (capacity_factor None)")
    shape = x.shape
    xf = x.reshape(-1, shape[-1])  # (N, d)
    logits = self.gate(xf).float()  # (N, E)
    probs = logits.softmax(dim=-1)  # (N, E)
    weights, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
    if self.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    combine = torch.zeros_like(probs).scatter(1, experts, weights).to(xf.dtype)  # (N, E)
    flat = experts.flatten()  # (N*k,)
    counts = probs.new_zeros(self.num_experts).scatter_add(0, flat, torch.ones_like(
        flat, dtype=probs.dtype))  # (E,)
    h = self.hidden
    gu = torch.einsum("nd,ehd->neh", xf, self.w13)  # (N, E, 2h)
    act = F.silu(gu[..., :h]) * gu[..., h:]  # (N, E, h)
    ye = torch.einsum("neh,edh->ned", act, self.w2)  # (N, E, d)
    y = (combine[..., None] * ye).sum(1)  # (N, d)
    if self.shared_expert is not None and self.shared_expert_gate is not None:
        y = y + torch.sigmoid(self.shared_expert_gate(xf)) * self.shared_expert(xf)
    return y.view(shape), RouterOutput(logits, probs, weights, experts, counts)


@contextmanager
def per_sample_mode(model: Transformer) -> Iterator[Transformer]:
    """Within: every MoE runs `dense_moe_forward` and the loss is the plain (vmap-able) one."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    fused = model.fused_loss
    for m in moes:
        m.forward = types.MethodType(dense_moe_forward, m)  # type: ignore[method-assign]
    model.fused_loss = False
    try:
        yield model
    finally:
        model.fused_loss = fused
        for m in moes:
            del m.forward


class _Loss(nn.Module):
    """loss(x (T,), y (T,)) of one sample: CE + the router's auxiliary losses, as in training."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        out = self.model.run(x[None], y[None])
        assert out.loss is not None
        return out.loss


def per_sample_grads(module: nn.Module, *batch: Tensor, chunk: int = 16
                     ) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sample gradients of `module(*sample)` (a scalar loss) for every trainable parameter.

    `module` is called through `torch.func.functional_call` with one sample of each tensor in
    `batch` (leading dim B removed). Returns ({name: (B, *param.shape)}, losses (B,)).
    """
    from torch.func import functional_call, grad_and_value, vmap

    params = {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in module.named_buffers()}

    def one(p: dict[str, Tensor], *sample: Tensor) -> Tensor:
        return functional_call(module, (p, buffers), sample)

    g = vmap(grad_and_value(one), in_dims=(None, *([0] * len(batch))), randomness="different")
    grads: dict[str, list[Tensor]] = {k: [] for k in params}
    losses = []
    for s in range(0, batch[0].shape[0], chunk):
        gs, ls = g(params, *(b[s:s + chunk] for b in batch))
        for k, v in gs.items():
            grads[k].append(v)
        losses.append(ls)
    return {k: torch.cat(v) for k, v in grads.items()}, torch.cat(losses)


def model_per_sample_grads(model: Transformer, x: Tensor, y: Tensor, chunk: int = 16
                           ) -> tuple[dict[str, Tensor], Tensor]:
    """x, y: (B, T) -> ({param name: (B, *shape)}, per-sample losses (B,)); names as in
    `model.named_parameters()`."""
    with per_sample_mode(model):
        wrapper = _Loss(model)
        grads, losses = per_sample_grads(wrapper, x, y, chunk=chunk)
    return {k.removeprefix("model."): v for k, v in grads.items()}, losses


def clip_sum(grads: dict[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], Tensor]:
    """Σ_i g_i · min(1, C / (‖g_i‖ + 1e-6)) over samples; also returns the norms ‖g_i‖ (B,)."""
    flat = torch.stack([g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads.values()])
    norms = flat.sum(0).sqrt()  # (B,) L2 norm over all parameters
    factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # (B,)
    return {k: torch.einsum("b,b...->...", factor.to(g.dtype), g) for k, g in grads.items()}, norms


# --------------------------------------------------------------------------- the DP-SGD step

def window_count(n_tokens: int, seq_len: int) -> int:
    """Disjoint training windows of seq_len + 1 tokens in a split of n_tokens."""
    return n_tokens // (seq_len + 1)


def poisson_indices(n: int, sample_rate: float, seed: int, step: int) -> np.ndarray:
    """Windows taken at `step`: each of n independently with probability q, from (seed, step)."""
    rng = np.random.default_rng([seed, step, 0xD1FF])
    return np.flatnonzero(rng.random(n) < sample_rate)


@dataclass
class DPState:
    """What `trustmoe.json` records under "dp"."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    expected_batch_size: int
    windows: int  # N: disjoint windows in the train split (the privacy unit)
    window_tokens: int
    planned_steps: int
    steps: int  # steps taken so far
    epsilon: float  # spent after `steps`
    accountant: str
    unit: str = "window"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DPStepResult:
    loss: float  # mean per-sample loss of the batch (nan when the batch is empty)
    batch_size: int
    clipped_fraction: float  # samples whose gradient norm exceeded C


class DPSGD:
    """Sets `p.grad` of every parameter to the privatised mean gradient of one Poisson batch."""

    def __init__(self, model: Transformer, tokens: np.ndarray, seq_len: int,
                 expected_batch: int, planned_steps: int, cfg: DPConfig, seed: int,
                 noise_multiplier: float | None = None, steps_done: int = 0) -> None:
        cfg.validate()
        self.model, self.tokens, self.seq_len, self.cfg, self.seed = model, tokens, seq_len, cfg, seed
        n = window_count(len(tokens), seq_len)
        if n < 2 * expected_batch:
            raise TrustmoeError(f"DP training needs at least {2 * expected_batch} windows of "
                                f"{seq_len + 1} tokens; the train split has {n}")
        if cfg.delta >= 1.0 / n:
            raise TrustmoeError(f"--dp-delta {cfg.delta} must be below 1/N = {1.0 / n:.3g} "
                                f"(N = {n} training windows)")
        q = expected_batch / n
        sigma = noise_multiplier if noise_multiplier is not None else calibrate_noise(
            cfg, q, planned_steps)
        self.state = DPState(cfg.epsilon, cfg.delta, cfg.max_grad_norm, sigma, q, expected_batch,
                             n, seq_len + 1, planned_steps, steps_done,
                             spent_epsilon(sigma, q, steps_done, cfg.delta, cfg.accountant),
                             cfg.accountant)

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The Poisson batch of `step`: inputs, targets (B, T) int64 (B may be 0)."""
        idx = poisson_indices(self.state.windows, self.state.sample_rate, self.seed, step)
        w = self.seq_len + 1
        rows = np.stack([np.asarray(self.tokens[i * w:(i + 1) * w], dtype=np.int64) for i in idx]
                        ) if len(idx) else np.zeros((0, w), dtype=np.int64)  # (B, T+1)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def step(self, step: int, generator: torch.Generator | None = None) -> DPStepResult:
        """Compute and store the noisy clipped gradient for `step` (no optimizer step)."""
        x, y = self.batch(step)
        dev = self.model.device
        params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        C, sigma = self.cfg.max_grad_norm, self.state.noise_multiplier
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        loss_sum, clipped, B = 0.0, 0, int(x.shape[0])
        for s in range(0, B, self.cfg.chunk):
            grads, losses = model_per_sample_grads(self.model, x[s:s + self.cfg.chunk].to(dev),
                                                   y[s:s + self.cfg.chunk].to(dev), self.cfg.chunk)
            summed, norms = clip_sum(grads, C)
            for k in total:
                total[k] += summed[k]
            loss_sum += float(losses.sum())
            clipped += int((norms > C).sum())
        g = generator or torch.Generator(device=dev).manual_seed(
            int(np.random.default_rng([self.seed, step, 0x5EED]).integers(2**62)))
        for k, p in params.items():
            noise = torch.randn(p.shape, generator=g, device=dev, dtype=p.dtype) * (sigma * C)
            p.grad = (total[k] + noise) / self.state.expected_batch_size
        self.state.steps = step + 1
        self.state.epsilon = spent_epsilon(sigma, self.state.sample_rate, self.state.steps,
                                           self.cfg.delta, self.cfg.accountant)
        return DPStepResult(loss_sum / B if B else float("nan"), B, clipped / B if B else 0.0)
