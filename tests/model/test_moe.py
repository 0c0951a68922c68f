"""The sorted, batched MoE fast path against a plain loop-over-experts reference.

The reference is written from the definition (router Linear -> fp32 softmax -> top-k ->
renormalise -> sum_k w_k * SwiGLU_k(x)), and must agree with `MoE.forward` to 1e-5 in fp32 for
the output and every gradient (input, router, stacked expert weights, shared expert).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from trustmoe.config import ModelConfig, get_preset
from trustmoe.model import functional as tf
from trustmoe.model.moe import (
    MoE,
    RouterOutput,
    SwiGLU,
    load_balancing_loss,
    router_z_loss,
    routing_stats,
)
from trustmoe.model.transformer import Transformer

ATOL = 1e-5


def reference_moe(moe: MoE, x: Tensor, capacity_factor: float | None = None) -> Tensor:
    """The functional core's loop-over-experts definition on this layer's weights.

    x: (..., d) -> (..., d)."""
    flat = x.reshape(-1, x.shape[-1])  # (N, d)
    shared = None
    if moe.shared_expert is not None and moe.shared_expert_gate is not None:
        se = moe.shared_expert
        shared = (torch.cat([se.gate_proj.weight, se.up_proj.weight]), se.down_proj.weight,
                  moe.shared_expert_gate.weight)
    capacity = None if capacity_factor is None else tf.expert_capacity(
        capacity_factor, flat.shape[0] * moe.top_k, moe.num_experts)
    y = tf.moe(flat, moe.gate.weight, moe.w13, moe.w2, moe.top_k, moe.norm_topk_prob, shared,
               capacity)
    return y.view_as(x)


def test_core_moe_is_the_textbook_definition() -> None:
    """`functional.moe` against the formula written out token by token (no sorting at all)."""
    moe = _moe(_cfg(num_local_experts=5, num_experts_per_tok=2, shared_expert_intermediate_size=24))
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(11))
    h = moe.hidden
    assert moe.shared_expert is not None and moe.shared_expert_gate is not None
    se, sg = moe.shared_expert, moe.shared_expert_gate.weight
    rows = []
    for t in range(7):
        p = torch.softmax(moe.gate.weight @ x[t], dim=-1)
        w, ids = torch.topk(p, 2)
        w = w / w.sum()
        y = sum(w[j] * (moe.w2[e] @ (F.silu(moe.w13[e, :h] @ x[t]) * (moe.w13[e, h:] @ x[t])))
                for j, e in enumerate(ids.tolist()))
        shared = se.down_proj.weight @ (F.silu(se.gate_proj.weight @ x[t]) * (se.up_proj.weight @ x[t]))
        rows.append(y + torch.sigmoid(sg @ x[t]) * shared)
    torch.testing.assert_close(reference_moe(moe, x), torch.stack(rows), rtol=0, atol=ATOL)


def _cfg(**kw: object) -> ModelConfig:
    base = dict(hidden_size=32, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def _moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(cfg)
    with torch.no_grad():  # larger than the 0.02 init so that every term matters
        moe.gate.weight.normal_(0, 0.5)
        moe.w13.normal_(0, 0.2)
        moe.w2.normal_(0, 0.2)
        for p in (moe.shared_expert.parameters() if moe.shared_expert else []):
            p.normal_(0, 0.2)
        if moe.shared_expert_gate is not None:
            moe.shared_expert_gate.weight.normal_(0, 0.5)
    return moe


def _grads(moe: MoE, x: Tensor, fn: object, gy: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    y = fn(moe, x)  # type: ignore[operator]
    y.backward(gy)
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    assert x.grad is not None
    grads["input"] = x.grad.clone()
    return y.detach(), grads


def _fast(moe: MoE, x: Tensor) -> Tensor:
    return moe(x)[0]


def _assert_matches_reference(moe: MoE, x: Tensor, capacity_factor: float | None = None) -> None:
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    y_fast, g_fast = _grads(moe, x, _fast, gy)
    y_ref, g_ref = _grads(moe, x, lambda m, t: reference_moe(m, t, capacity_factor), gy)
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=ATOL)
    assert set(g_fast) == set(g_ref) and {"input", "gate.weight", "w13", "w2"} <= set(g_fast)
    for name in g_ref:
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize(("E", "k", "shape"), [
    (4, 2, (3, 5)),  # Mixtral-like, batch dims
    (4, 1, (2, 7)),  # top-1 (Switch)
    (6, 3, (17,)),  # top-3 of 6, flat tokens
    (8, 2, (1, 1)),  # a single token: most experts get nothing
    (2, 2, (4, 3)),  # every expert chosen by every token
    (5, 2, (2, 2, 6)),  # extra leading dims
])
def test_fast_path_matches_reference_forward_and_backward(
    E: int, k: int, shape: tuple[int, ...]
) -> None:
    moe = _moe(_cfg(num_local_experts=E, num_experts_per_tok=k))
    x = torch.randn(*shape, 32, generator=torch.Generator().manual_seed(E * 10 + k))
    _assert_matches_reference(moe, x)


def test_without_renormalisation() -> None:
    moe = _moe(_cfg(num_local_experts=6, num_experts_per_tok=2, norm_topk_prob=False))
    x = torch.randn(4, 9, 32)
    _assert_matches_reference(moe, x)
    r = moe.route(x.reshape(-1, 32))
    assert bool((r.weights.sum(-1) < 1 - 1e-3).all())  # raw top-k probabilities, not summing to 1


def test_expert_that_receives_no_token_gets_zero_gradient() -> None:
    moe = _moe(_cfg(num_local_experts=4, num_experts_per_tok=2))
    x = torch.randn(3, 8, 32)
    x[..., 0] = x[..., 0].abs() + 1  # feature 0 is always >= 1 ...
    with torch.no_grad():  # ... and expert 0's router row only reads it, negatively
        moe.gate.weight[0] = 0.0
        moe.gate.weight[0, 0] = -20.0
    _assert_matches_reference(moe, x)
    r = moe.route(x.reshape(-1, 32))
    assert int(r.counts[0]) == 0 and int(r.counts.sum()) == 3 * 8 * 2
    moe.zero_grad(set_to_none=True)
    moe(x)[0].pow(2).sum().backward()
    assert moe.w13.grad is not None and moe.w2.grad is not None
    assert bool((moe.w13.grad[0] == 0).all()) and bool((moe.w2.grad[0] == 0).all())
    assert bool((moe.w13.grad[1:] != 0).any())
    assert routing_stats(r).dead_fraction == pytest.approx(0.25)


def test_single_expert_is_a_dense_swiglu() -> None:
    cfg = _cfg(num_local_experts=1, num_experts_per_tok=1)
    moe = _moe(cfg)
    dense = SwiGLU(32, 48)
    with torch.no_grad():
        dense.gate_proj.weight.copy_(moe.w13[0, :48])
        dense.up_proj.weight.copy_(moe.w13[0, 48:])
        dense.down_proj.weight.copy_(moe.w2[0])
    x = torch.randn(2, 5, 32)
    _assert_matches_reference(moe, x)
    torch.testing.assert_close(moe(x)[0], dense(x), rtol=0, atol=ATOL)


def test_shared_expert_matches_reference() -> None:
    moe = _moe(_cfg(num_local_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=40))
    assert moe.shared_expert is not None
    x = torch.randn(3, 6, 32)
    _assert_matches_reference(moe, x)
    _, grads = _grads(moe, x, _fast, torch.ones(3, 6, 32))
    for name in ("shared_expert.gate_proj.weight", "shared_expert.down_proj.weight",
                 "shared_expert_gate.weight"):
        assert name in grads and bool((grads[name] != 0).any())


def test_capacity_factor_drops_and_keeps_exactly() -> None:
    cfg = _cfg(num_local_experts=4, num_experts_per_tok=2, capacity_factor=0.5)
    moe = _moe(cfg)
    with torch.no_grad():  # make routing lopsided so that some experts overflow
        moe.gate.weight[0] += 0.8 * moe.gate.weight[1]
    x = torch.randn(4, 8, 32)
    _assert_matches_reference(moe, x, capacity_factor=0.5)
    y, r = moe(x)
    N = 32
    capacity = math.ceil(0.5 * N * 2 / 4)
    expected_drop = int((r.counts - capacity).clamp(min=0).sum())
    assert expected_drop > 0 and r.dropped == expected_drop
    assert routing_stats(r).dropped == expected_drop

    dropless = _moe(_cfg(num_local_experts=4, num_experts_per_tok=2))
    dropless.load_state_dict(moe.state_dict())
    y_full = dropless(x)[0].reshape(N, 32)
    # which assignments survived: each expert keeps its first `capacity` tokens in token order
    kept = torch.zeros(N, 2, dtype=torch.bool)
    for e in range(4):
        tok, slot = torch.where(r.experts == e)
        kept[tok[:capacity], slot[:capacity]] = True
    y = y.reshape(N, 32)
    full_rows, empty_rows = kept.all(-1), ~kept.any(-1)
    assert bool(full_rows.any())
    torch.testing.assert_close(y[full_rows], y_full[full_rows], rtol=0, atol=ATOL)
    assert bool((y[empty_rows] == 0).all())


def test_capacity_factor_is_training_only() -> None:
    """In eval() mode a capacity factor drops nothing: the layer equals the dropless one."""
    moe = _moe(_cfg(num_local_experts=4, num_experts_per_tok=2, capacity_factor=0.5))
    with torch.no_grad():
        moe.gate.weight[0] += 0.8 * moe.gate.weight[1]
    x = torch.randn(4, 8, 32)
    assert moe.training and moe(x)[1].dropped > 0
    moe.eval()
    y, r = moe(x)
    assert r.dropped == 0
    torch.testing.assert_close(y, reference_moe(moe, x), rtol=0, atol=ATOL)


def test_large_capacity_factor_is_dropless() -> None:
    moe = _moe(_cfg(capacity_factor=100.0))
    dropless = _moe(_cfg())
    x = torch.randn(3, 7, 32)
    y, r = moe(x)
    assert r.dropped == 0
    torch.testing.assert_close(y, dropless(x)[0], rtol=0, atol=0)


def _router(probs: Tensor, k: int) -> RouterOutput:
    weights, experts = probs.topk(k, dim=-1)
    counts = torch.bincount(experts.flatten(), minlength=probs.shape[-1])
    return RouterOutput(probs.log(), probs, weights, experts, counts)


def test_load_balancing_loss_is_one_when_balanced_and_E_when_collapsed() -> None:
    E, N = 4, 8
    # perfectly balanced: uniform probabilities and every expert chosen equally often
    probs = torch.full((N, E), 1 / E)
    experts = torch.arange(N * 2).remainder(E).view(N, 2)
    r = RouterOutput(probs.log(), probs, torch.full((N, 2), 0.5), experts,
                     torch.bincount(experts.flatten(), minlength=E))
    assert float(load_balancing_loss(r)) == pytest.approx(1.0, abs=1e-6)
    # collapsed: every token sends everything to expert 0
    probs = torch.tensor([[1.0 - 3e-6, 1e-6, 1e-6, 1e-6]]).repeat(N, 1)
    assert float(load_balancing_loss(_router(probs, 1))) == pytest.approx(E, rel=1e-4)


def test_load_balancing_loss_matches_transformers() -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(3))
    for k in (1, 2, 3):
        r = _router(logits.softmax(-1), k)
        theirs = load_balancing_loss_func((logits,), num_experts=6, top_k=k)
        # transformers normalises assignments by tokens (sums to k), we by assignments (sums to 1)
        torch.testing.assert_close(load_balancing_loss(r) * k, theirs, rtol=1e-6, atol=1e-6)


def test_router_z_loss_definition() -> None:
    logits = torch.randn(20, 5, generator=torch.Generator().manual_seed(4)) * 3
    r = RouterOutput(logits, logits.softmax(-1), *logits.softmax(-1).topk(2), torch.zeros(5))
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 20
    assert float(router_z_loss(r)) == pytest.approx(expected, rel=1e-5)


def test_routing_stats() -> None:
    moe = _moe(_cfg(num_local_experts=6, num_experts_per_tok=2))
    x = torch.randn(5, 9, 32)
    r = moe.route(x.reshape(-1, 32))
    s = routing_stats(r)
    assert sum(s.tokens_per_expert) == 45 * 2 and len(s.tokens_per_expert) == 6
    assert s.dead_fraction == sum(c == 0 for c in s.tokens_per_expert) / 6
    assert 0.0 <= s.load_entropy <= 1.0 and 0.0 <= s.router_entropy <= 1.0
    # uniform router: both entropies are exactly 1
    uniform = _router(torch.full((12, 6), 1 / 6), 2)
    uniform.counts = torch.full((6,), 4)
    u = routing_stats(uniform)
    assert u.load_entropy == pytest.approx(1.0) and u.router_entropy == pytest.approx(1.0)
    # all load on one expert: load entropy 0, five dead experts
    one = _router(torch.tensor([[0.9, 0.02, 0.02, 0.02, 0.02, 0.02]]).repeat(12, 1), 1)
    o = routing_stats(one)
    assert o.load_entropy == pytest.approx(0.0) and o.dead_fraction == pytest.approx(5 / 6)
    assert 0.0 < o.router_entropy < 1.0


def test_model_loss_is_ce_plus_weighted_router_losses() -> None:
    cfg = get_preset("tiny").model.replace(router_aux_loss_coef=0.3, router_z_loss_coef=0.05)
    torch.manual_seed(0)
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt[0, :3] = -100
    out = model.run(idx, targets=tgt, return_stats=True)
    assert out.loss is not None and out.aux_loss is not None and out.z_loss is not None
    ce = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), tgt.reshape(-1))
    torch.testing.assert_close(out.ce_loss, ce)
    torch.testing.assert_close(out.loss, ce + 0.3 * out.aux_loss + 0.05 * out.z_loss)
    assert len(out.routing) == cfg.num_hidden_layers
    assert all(sum(s.tokens_per_expert) == 32 * 2 for s in out.routing)


def test_fast_path_under_bf16_autocast() -> None:
    """The trainer's `--dtype bfloat16`: experts run in bf16, gradients land in fp32 params."""
    moe = _moe(_cfg())
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)[0]
        y_ref = reference_moe(moe, x)
    assert not torch.equal(y.float(), moe(x)[0])  # bf16 rounding shows: the matmuls ran in bf16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=0, atol=3e-2)
    y.float().pow(2).sum().backward()
    assert moe.w13.grad is not None and moe.w13.grad.dtype == torch.float32
    assert bool(torch.isfinite(moe.w13.grad).all()) and bool((moe.w13.grad != 0).any())
