"""The functional core against transformers' Mixtral/Llama pieces, function by function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import MixtralConfig
from transformers.models.mixtral import modeling_mixtral as hf

from trustmoe.model import functional as tf

ATOL = 1e-6


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype: torch.dtype) -> None:
    x = (torch.randn(3, 5, 48, generator=_g(0)) * 3).to(dtype)
    ref = hf.MixtralRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(48, generator=_g(1)))
    ours = tf.rms_norm(x, ref.weight.detach(), 1e-5)
    assert ours.dtype == ref(x).dtype
    torch.testing.assert_close(ours, ref(x), atol=0, rtol=0)


@pytest.mark.parametrize("hd, theta", [(8, 10000.0), (12, 1e6), (64, 500.0)])
def test_rope_matches_transformers(hd: int, theta: float) -> None:
    cfg = MixtralConfig(hidden_size=4 * hd, num_attention_heads=4, head_dim=hd, rope_theta=theta,
                        max_position_embeddings=256)
    rot = hf.MixtralRotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 7, 100, 255]])
    q = torch.randn(1, 4, 5, hd, generator=_g(2))
    k = torch.randn(1, 2, 5, hd, generator=_g(3))
    cos_ref, sin_ref = rot(q, pos)  # (1, 5, hd)
    cos, sin = tf.rope_tables(tf.rope_inv_freq(hd, theta), 256)  # (256, hd)
    torch.testing.assert_close(cos[pos[0]], cos_ref[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(sin[pos[0]], sin_ref[0], atol=ATOL, rtol=0)
    q_ref, k_ref = hf.apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    torch.testing.assert_close(tf.apply_rope(q, cos[pos], sin[pos]), q_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(tf.apply_rope(k, cos[pos], sin[pos]), k_ref, atol=1e-5, rtol=0)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' eager attention: repeat_kv, additive mask, fp32 softmax."""
    rep = q.shape[1] // k.shape[1]
    kk, vv = hf.repeat_kv(k, rep), hf.repeat_kv(v, rep)
    w = q @ kk.transpose(2, 3) / q.shape[-1] ** 0.5
    w = w + torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    return torch.softmax(w, dim=-1) @ vv


@pytest.mark.parametrize("H, Hkv", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("start", [0, 5])
def test_attention_gqa_and_offset_causal_mask(H: int, Hkv: int, start: int) -> None:
    T, hd = 6, 16
    S = start + T
    q = torch.randn(2, H, T, hd, generator=_g(4))
    k = torch.randn(2, Hkv, S, hd, generator=_g(5))
    v = torch.randn(2, Hkv, S, hd, generator=_g(6))
    mask = tf.causal_mask(start, T)
    assert mask is not None and mask.shape == (T, S)
    assert bool(mask[0, start]) and not bool(mask[0, start + 1]) and bool(mask[-1].all())
    torch.testing.assert_close(tf.attention(q, k, v, mask), _eager(q, k, v, mask), atol=1e-5, rtol=0)
    if start == 0:  # the is_causal shortcut is the same function
        torch.testing.assert_close(tf.attention(q, k, v, causal=True), _eager(q, k, v, mask),
                                   atol=1e-5, rtol=0)
    assert tf.causal_mask(start, 1) is None  # one query sees every key: no mask


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_matches_transformers_router(norm: bool, k: int) -> None:
    cfg = MixtralConfig(hidden_size=32, num_local_experts=6, num_experts_per_tok=k)
    router = hf.MixtralTopKRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.5, generator=_g(7))
    x = torch.randn(20, 32, generator=_g(8))
    logits, scores, idx = router(x)
    probs, w, e = tf.route(F.linear(x, router.weight), k, norm)
    torch.testing.assert_close(probs, torch.softmax(logits.float(), -1), atol=0, rtol=0)
    assert torch.equal(e, idx) and w.dtype == torch.float32
    if norm:  # transformers' Mixtral always renormalises
        torch.testing.assert_close(w, scores, atol=ATOL, rtol=0)
    else:
        torch.testing.assert_close(w, probs.gather(1, idx), atol=0, rtol=0)
        assert bool((w.sum(-1) < 1).all()) or k == 6


@pytest.mark.parametrize("k", [1, 2, 3])
def test_moe_matches_transformers_sparse_moe_block(k: int) -> None:
    cfg = MixtralConfig(hidden_size=32, intermediate_size=40, num_local_experts=5,
                        num_experts_per_tok=k, hidden_act="silu")
    block = hf.MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3, generator=_g(9))
    x = torch.randn(2, 7, 32, generator=_g(10))
    with torch.no_grad():
        ref = block(x).reshape(14, 32)
        ours = tf.moe(x.reshape(14, 32), block.gate.weight, block.experts.gate_up_proj,
                      block.experts.down_proj, k, True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_mlp_and_shared_expert_pieces() -> None:
    x = torch.randn(9, 16, generator=_g(11))
    w13 = torch.randn(2 * 24, 16, generator=_g(12)) * 0.3
    w2 = torch.randn(16, 24, generator=_g(13)) * 0.3
    gate = torch.randn(1, 16, generator=_g(14))
    ref = (F.silu(x @ w13[:24].T) * (x @ w13[24:].T)) @ w2.T
    torch.testing.assert_close(tf.mlp(x, w13, w2), ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(tf.gate_shared(x @ gate.T, ref), torch.sigmoid(x @ gate.T) * ref)
    outs = torch.randn(9, 3, 16, generator=_g(15))
    wts = torch.rand(9, 3, generator=_g(16))
    torch.testing.assert_close(tf.moe_combine(outs, wts), (outs * wts[..., None]).sum(1),
                               atol=1e-6, rtol=0)


def test_capacity_keeps_each_experts_first_tokens() -> None:
    """The training-only capacity drops assignments beyond it, in token order."""
    x = torch.randn(12, 16, generator=_g(17))
    router = torch.zeros(3, 16)  # every token: equal logits -> topk picks experts 0 and 1
    w13 = torch.randn(3, 2 * 8, 16, generator=_g(18))
    w2 = torch.randn(3, 16, 8, generator=_g(19))
    cap = tf.expert_capacity(0.5, 12 * 2, 3)
    assert cap == 4
    dropped = tf.moe(x, router, w13, w2, 2, True, capacity=cap)
    full = tf.moe(x, router, w13, w2, 2, True)
    torch.testing.assert_close(dropped[:cap], full[:cap])  # first tokens keep both experts
    assert bool((dropped[cap:] == 0).all())  # the rest lose both
