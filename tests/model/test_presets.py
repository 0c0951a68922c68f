"""Every named preset builds, runs forward + backward, and counts its parameters correctly.

In the spirit of litgpt's `test_config_hub.py`: no preset can rot unnoticed.
"""

from __future__ import annotations

import math

import pytest
import torch

from trustmoe.config import PRESETS, ModelConfig, get_preset
from trustmoe.model.hf import config_from_hf, hf_config_dict
from trustmoe.model.moe import MoE
from trustmoe.model.transformer import Transformer


def _active_from_model(model: Transformer) -> int:
    """Parameters one token touches, read off the built modules (not the config formula)."""
    total = sum(p.numel() for p in model.parameters())
    cfg = model.config
    for block in model.layers:
        if isinstance(block.mlp, MoE):
            per_expert = (block.mlp.w13.numel() + block.mlp.w2.numel()) // cfg.num_local_experts
            total -= (cfg.num_local_experts - cfg.num_experts_per_tok) * per_expert
    return total


def _big(name: str) -> bool:
    return PRESETS[name].model.num_parameters() > 50_000_000


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if _big(n) else n for n in sorted(PRESETS)
])
def test_preset_builds_runs_and_counts(name: str) -> None:
    cfg = get_preset(name).model
    torch.manual_seed(0)
    model = Transformer(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
    assert cfg.num_parameters(active=True) == _active_from_model(model)
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    out = model.run(idx, targets=torch.roll(idx, -1, dims=1), return_stats=True)
    assert out.logits.shape == (2, 8, cfg.vocab_size)
    assert out.loss is not None and torch.isfinite(out.loss)
    # random init: the loss is near log(V)
    assert out.ce_loss is not None
    assert abs(out.ce_loss.item() - math.log(cfg.vocab_size)) < 1.0
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:3]}"
    assert len(out.routing) == (cfg.num_hidden_layers if cfg.is_moe else 0)
    # the Hugging Face config round-trips (extras travel in trustmoe.json)
    assert config_from_hf(hf_config_dict(cfg), cfg.to_dict()) == cfg.replace(head_dim=cfg.head_size)


@pytest.mark.parametrize("name", [n for n in sorted(PRESETS) if PRESETS[n].model.is_moe])
def test_dense_twin_has_same_active_parameters(name: str) -> None:
    moe = get_preset(name).model
    twin = moe.dense_twin()
    if f"{name}-dense" in PRESETS:
        assert get_preset(f"{name}-dense").model == twin
    assert not twin.is_moe
    # only the router (d x E per layer) separates them; attention and embeddings are identical
    router = moe.num_hidden_layers * moe.hidden_size * moe.num_local_experts
    assert moe.num_parameters(active=True) - twin.num_parameters(active=True) == router
    # a dense model's active parameters are all of them
    assert twin.num_parameters(active=True) == twin.num_parameters()


def test_dense_twin_with_shared_expert_and_tied_embeddings() -> None:
    moe = get_preset("tiny").model.replace(shared_expert_intermediate_size=40,
                                           tie_word_embeddings=True)
    twin = moe.dense_twin()
    assert twin.intermediate_size == moe.intermediate_size * moe.num_experts_per_tok + 40
    d, L, E = moe.hidden_size, moe.num_hidden_layers, moe.num_local_experts
    # router (d x E) and the shared expert's sigmoid gate (d x 1) per layer
    assert moe.num_parameters(active=True) - twin.num_parameters(active=True) == L * (d * E + d)
    for cfg in (moe, twin):
        model = Transformer(cfg)
        assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
        assert cfg.num_parameters(active=True) == _active_from_model(model)


def test_unknown_preset_names_the_known_ones() -> None:
    from trustmoe.config import ConfigError

    with pytest.raises(ConfigError, match="tiny"):
        get_preset("nope")
    assert isinstance(get_preset("tiny").model, ModelConfig)
