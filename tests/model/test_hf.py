"""Hugging Face interop: our dirs load in transformers, theirs load in trustmoe, same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

import trustmoe
from trustmoe.config import ModelConfig, get_preset
from trustmoe.io import TrustmoeError
from trustmoe.model import ModelLoadError, Transformer, save_model

ATOL = 1e-4


def _ids(vocab: int, B: int = 2, T: int = 24) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))


def _randomise_norms(model: torch.nn.Module) -> None:
    """Norm weights start at 1.0; perturb them so a mis-mapped norm cannot hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("cfg", [
    get_preset("tiny").model,
    get_preset("tiny-dense").model,
    get_preset("tiny").model.replace(tie_word_embeddings=True, rope_theta=1e6),
    get_preset("tiny").model.replace(num_local_experts=6, num_experts_per_tok=3, head_dim=24),
], ids=["mixtral", "llama", "tied-theta1e6", "6experts-top3-hd24"])
def test_transformers_loads_our_dir_with_same_logits(cfg: ModelConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    _randomise_norms(ours)
    save_model(ours, tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == ("mixtral" if cfg.is_moe else "llama")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = _ids(cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), rtol=0, atol=ATOL)
    back = trustmoe.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)


def _hf_mixtral(**kw: object) -> MixtralForCausalLM:
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=2, num_local_experts=4,
                num_experts_per_tok=2, max_position_embeddings=128)
    base.update(kw)
    return MixtralForCausalLM(MixtralConfig(**base))


def _hf_llama(**kw: object) -> LlamaForCausalLM:
    base = dict(vocab_size=300, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128)
    base.update(kw)
    return LlamaForCausalLM(LlamaConfig(**base))


@pytest.mark.parametrize("make, shard", [
    (lambda: _hf_mixtral(), False),  # GQA ratio 4, head dim 8
    (lambda: _hf_mixtral(num_local_experts=6, num_experts_per_tok=3, rope_theta=1e6), False),
    (lambda: _hf_mixtral(num_key_value_heads=8, head_dim=24), True),  # MHA, head dim != d/H
    (lambda: _hf_mixtral(tie_word_embeddings=True), False),
    (lambda: _hf_llama(), True),  # GQA ratio 2, head dim 16
    (lambda: _hf_llama(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=1e6), False),
], ids=["mixtral-gqa4", "mixtral-6x3-theta1e6", "mixtral-mha-hd24-sharded", "mixtral-tied",
        "llama-sharded", "llama-mqa-tied"])
def test_we_load_transformers_dirs_with_same_logits(make, shard: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    hf = make().eval()
    _randomise_norms(hf)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if shard else "10GB")
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
    ours = trustmoe.load(tmp_path)
    x = _ids(hf.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, rtol=0, atol=ATOL)


def test_pickle_only_dir_is_refused_without_unpickling(tmp_path: Path, monkeypatch) -> None:
    save_model(Transformer(get_preset("tiny").model), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")

    def forbidden(*a: object, **k: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*safetensors"):
        trustmoe.load(tmp_path)


def test_missing_and_misshaped_tensors_are_named(tmp_path: Path) -> None:
    save_model(Transformer(get_preset("tiny").model), tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    key = "model.layers.1.self_attn.q_proj.weight"
    sd[key] = sd[key][:, :10].contiguous()
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "integrity.json").unlink()  # as a foreign dir: the shape check must answer
    with pytest.raises(ModelLoadError, match=r"q_proj.*shape \(64, 10\)"):
        trustmoe.load(tmp_path)
    del sd[key]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"missing tensor layers\.1\.self_attn\.q_proj"):
        trustmoe.load(tmp_path)


@pytest.mark.parametrize("content, msg", [
    ("{not json", "malformed JSON"),
    ('{"model_type": "gpt2"}', "unsupported model_type"),
    ('{"model_type": "llama", "hidden_size": 8}', "lacks required field"),
    ('{"model_type": "llama", "vocab_size": 10, "hidden_size": 6, "intermediate_size": 4, '
     '"num_hidden_layers": 1, "num_attention_heads": 4}', "impossible model"),
])
def test_bad_config(tmp_path: Path, content: str, msg: str) -> None:
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(TrustmoeError, match=msg):
        trustmoe.load(tmp_path)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        trustmoe.load(tmp_path / "nothing")
