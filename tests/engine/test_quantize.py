"""Weight-only quantization: error bounds, kernels vs dequantized reference, saved artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import random_prompts

from trustmoe.engine import Engine, SamplingParams
from trustmoe.engine.artifact import QUANT_FILE, save_quantized
from trustmoe.engine.kv_cache import PagedKVCache
from trustmoe.engine.quantize import (
    Int4Weight,
    Int8Weight,
    make_weight,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from trustmoe.engine.runner import Chunk, ModelRunner
from trustmoe.engine.weights import build_weights
from trustmoe.io import TrustmoeError
from trustmoe.model import Transformer
from trustmoe.model.hf import hf_state_dict


def _w(N: int = 96, K: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int8_per_channel_error_is_within_half_a_step() -> None:
    w = _w()
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (96,)
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())
    assert int(q.abs().max()) == 127  # each row uses its full range


def test_int4_pack_unpack_and_group_error() -> None:
    w = _w()
    packed, scale, zero = quantize_int4(w, 32)
    assert packed.shape == (96, 64) and packed.dtype == torch.uint8 and scale.shape == (96, 4)
    q = unpack_int4(packed)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    deq = Int4Weight(packed, scale, zero, 32).dequantize()
    step = scale.repeat_interleave(32, dim=1)
    assert bool(((deq - w).abs() <= step / 2 + 1e-6).all())
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(w, 48)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_kernels_agree_with_dequantized_matmul(mode: str) -> None:
    w = _w(256, 128)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    wt = make_weight(w, mode, group_size=32)
    assert isinstance(wt, Int8Weight if mode == "int8" else Int4Weight)
    ref = x @ wt.dequantize().t()
    # without the compiled kernels, fbgemm's int8 path also quantizes activations: allow that
    tol = 2e-2 if mode == "int8" else 1e-4
    torch.testing.assert_close(wt.mm(x), ref, atol=tol * float(ref.abs().max()), rtol=0)
    exact = make_weight(w, mode, group_size=32, exact_int8=True)
    torch.testing.assert_close(exact.mm(x), ref, atol=1e-4, rtol=0)
    assert wt.nbytes < w.numel() * 4 / (3 if mode == "int8" else 5)


@pytest.mark.parametrize("mode, max_drop", [("int8", 0.05), ("int4", 0.5)])
def test_quantized_engine_stays_close_to_fp32(tiny_model: Transformer, mode: str,
                                              max_drop: float) -> None:
    prompt = random_prompts([30], 512, seed=9)[0]
    ref = Engine(tiny_model, kv_cache_mb=4).generate([prompt], max_tokens=1, prompt_logprobs=0)[0]
    q = Engine(tiny_model, quantize=mode, kv_cache_mb=4).generate(
        [prompt], max_tokens=1, prompt_logprobs=0)[0]
    a = torch.tensor(ref.prompt_logprobs[1:])
    b = torch.tensor(q.prompt_logprobs[1:])  # type: ignore[index]
    rel = float((a.mean() - b.mean()).abs() / a.mean().abs())
    assert rel < max_drop
    assert not torch.equal(a, b)  # quantization really happened


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_saved_artifact_reloads_to_the_same_outputs(tiny_dir: Path, tmp_path: Path,
                                                    mode: str) -> None:
    eng = Engine(tiny_dir, quantize=mode, group_size=32, kv_cache_mb=4)
    out = save_quantized(eng.weights, tmp_path / f"q-{mode}", tiny_dir, group_size=32)
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["method"] == mode and meta["source_sha256"]
    size = (out / QUANT_FILE).stat().st_size
    assert size < (tiny_dir / "model.safetensors").stat().st_size * 0.6
    again = Engine(out, kv_cache_mb=4)
    assert again.weights.quantize == mode and again.model_name == f"q-{mode}"
    sp = SamplingParams(max_tokens=8, ignore_eos=True, logprobs=0)
    a = eng.generate(["the cat"], params=sp)[0]
    b = again.generate(["the cat"], params=sp)[0]
    assert a.token_ids == b.token_ids and a.text == b.text
    assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]


def test_corrupt_artifact_is_one_clear_error(tiny_dir: Path, tmp_path: Path) -> None:
    eng = Engine(tiny_dir, quantize="int8", kv_cache_mb=4)
    out = save_quantized(eng.weights, tmp_path / "q", tiny_dir)
    (out / QUANT_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(TrustmoeError, match=f"integrity check: changed: {QUANT_FILE}"):
        Engine(out)
    (out / "integrity.json").unlink()  # as a foreign dir: the header check must answer
    with pytest.raises(TrustmoeError, match="not a safetensors file"):
        Engine(out)
    with pytest.raises(TrustmoeError, match="not quantized"):
        save_quantized(Engine(tiny_dir, kv_cache_mb=4).weights, tmp_path / "x", tiny_dir)
    with pytest.raises(ValueError, match="quantize"):
        Engine(tiny_dir, quantize="int3")


def test_gather_moe_path_matches_sorted_path(tiny_model: Transformer) -> None:
    cfg = tiny_model.config
    w = build_weights(hf_state_dict(tiny_model), cfg)
    outs = []
    for path in ("sorted", "gather"):
        kv = PagedKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_size, 8, 16,
                          torch.float32, torch.device("cpu"))
        r = ModelRunner(w, kv, torch.device("cpu"), moe_path=path)
        a, b = torch.arange(0, 32), torch.arange(64, 96)  # two sequences' slots
        r.forward([Chunk(list(range(3, 20)), 0, a[:17], "none"),
                   Chunk(list(range(30, 40)), 0, b[:10], "none")])
        dec = r.forward([Chunk([7], 17, a[:18]), Chunk([9], 10, b[:11])])
        outs.append(torch.cat([d for d in dec if d is not None]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=0)


def test_quantize_model_dir_writes_a_loadable_artifact(tiny_dir: Path, tmp_path: Path) -> None:
    from trustmoe.engine.artifact import quantize_model_dir

    info = quantize_model_dir(tiny_dir, tmp_path / "q8", "int8")
    assert info["bytes"] < info["source_bytes"] / 2  # type: ignore[operator]
    eng = Engine(tmp_path / "q8", kv_cache_mb=4)
    assert eng.weights.quantize == "int8" and eng.tokenizer is not None
    with pytest.raises(TrustmoeError, match="int8 or int4"):
        quantize_model_dir(tiny_dir, tmp_path / "bad", "int2")
    assert not (tmp_path / "bad").exists()


def test_quantize_command_uses_the_engine_settings(tiny_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trustmoe.cli import app
    from trustmoe.config import ConfigError, EngineConfig

    r = CliRunner().invoke(app, ["quantize", str(tiny_dir), str(tmp_path / "q4"), "--method",
                                 "int4", "--group-size", "32", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["method"] == "int4" and info["group_size"] == 32
    assert Engine(tmp_path / "q4", kv_cache_mb=4).weights.quantize == "int4"
    r = CliRunner().invoke(app, ["quantize", "--help"])
    assert f"[default: {EngineConfig().group_size}]" in r.output  # the one declared default
    r = CliRunner().invoke(app, ["quantize", str(tiny_dir), str(tmp_path / "bad"), "--method", "int2"])
    assert isinstance(r.exception, ConfigError) and "int8" in str(r.exception)
    assert not (tmp_path / "bad").exists()
