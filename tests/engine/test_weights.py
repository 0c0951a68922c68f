"""The engine reads weights by their Hugging Face names only (the table in engine/weights.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from trustmoe.config import get_preset
from trustmoe.engine.quantize import Weight
from trustmoe.engine.weights import RunnerWeights, build_weights, weights_state_dict
from trustmoe.model import ModelLoadError, Transformer, save_model
from trustmoe.model.hf import canonical_hf_names, config_from_hf, hf_state_dict, read_safetensors


def _all(w: RunnerWeights) -> list[torch.Tensor]:
    out = [w.embed, w.norm, w.cos, w.sin]
    for lw in w.layers:
        out += [lw.ln1, lw.ln2]
    return out + [x.dequantize() for x in w.all_weights()]


def _same(a: RunnerWeights, b: RunnerWeights) -> None:
    ta, tb = _all(a), _all(b)
    assert len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))
    assert [type(x) for x in a.all_weights()] == [type(x) for x in b.all_weights()]


def test_transformers_in_memory_fused_layout_reads_the_same(tmp_path: Path) -> None:
    """transformers 5 keeps experts fused in memory and per-expert on disk; both read alike."""
    torch.manual_seed(0)
    hf = MixtralForCausalLM(MixtralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2))
    assert any(k.endswith("experts.gate_up_proj") for k in hf.state_dict())
    hf.save_pretrained(tmp_path)
    cfg = config_from_hf(hf.config.to_dict())
    in_memory = build_weights(canonical_hf_names(hf.state_dict(), cfg), cfg)
    on_disk = build_weights(canonical_hf_names(read_safetensors(tmp_path), cfg), cfg)
    _same(in_memory, on_disk)


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
@pytest.mark.parametrize("preset, tied", [("tiny", False), ("tiny", True), ("tiny-dense", False)])
def test_state_dict_round_trip_in_every_stored_form(mode: str | None, preset: str, tied: bool) -> None:
    cfg = get_preset(preset).model.replace(tie_word_embeddings=tied,
                                           shared_expert_intermediate_size=32 if preset == "tiny" else 0)
    torch.manual_seed(0)
    m = Transformer(cfg)
    w = build_weights(hf_state_dict(m), cfg, mode, group_size=16)
    sd = weights_state_dict(w)
    if mode == "int8":
        assert sd["model.layers.0.self_attn.k_proj.weight.q"].dtype == torch.int8
    if mode == "int4":
        assert "model.layers.1.block_sparse_moe.experts.3.w3.weight.q4" in sd or preset == "tiny-dense"
    again = build_weights(sd, cfg, group_size=16)
    again.quantize = mode
    _same(w, again)


def test_missing_misshaped_and_unexpected_tensors_are_named() -> None:
    cfg = get_preset("tiny").model
    sd = dict(hf_state_dict(Transformer(cfg)))
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    with pytest.raises(ModelLoadError, match=f"missing tensor {key}"):
        build_weights({k: v for k, v in sd.items() if k != key}, cfg)
    with pytest.raises(ModelLoadError, match=r"self_attn\.v_proj\.weight has shape \(32, 60\)"):
        build_weights({**sd, "model.layers.0.self_attn.v_proj.weight": torch.zeros(32, 60)}, cfg)
    with pytest.raises(ModelLoadError, match=r"unexpected tensor model\.layers\.0\.extra"):
        build_weights({**sd, "model.layers.0.extra": torch.zeros(1)}, cfg)
    q8 = weights_state_dict(build_weights(sd, cfg, "int8"))
    del q8["model.layers.0.self_attn.o_proj.weight.scale"]
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.0\.self_attn\.o_proj\.weight\.scale"):
        build_weights(q8, cfg)
    mixed = weights_state_dict(build_weights(sd, cfg, "int8"))
    for s in (".q", ".scale"):
        del mixed[f"model.layers.0.self_attn.k_proj.weight{s}"]
    mixed["model.layers.0.self_attn.k_proj.weight"] = sd["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ModelLoadError, match="different forms"):
        build_weights(mixed, cfg)


def test_model_directory_and_module_read_identically(tmp_path: Path) -> None:
    cfg = get_preset("tiny").model.replace(shared_expert_intermediate_size=24)
    torch.manual_seed(1)
    m = Transformer(cfg)
    save_model(m, tmp_path)
    from_dir = build_weights(canonical_hf_names(read_safetensors(tmp_path), cfg), cfg)
    _same(build_weights(hf_state_dict(m), cfg), from_dir)
    assert isinstance(from_dir.layers[0].shared_gate, Weight)
