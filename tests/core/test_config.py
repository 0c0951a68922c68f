"""`EngineConfig` (every engine setting declared once) and the one device rule."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trustmoe.config import ConfigError, EngineConfig, resolve_device
from trustmoe.io import TrustmoeError


def test_auto_is_cuda_when_available_else_cpu() -> None:
    want = "cuda" if torch.cuda.is_available() else "cpu"
    for spec in ("auto", None, "", " auto "):
        assert resolve_device(spec).type == want
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("spec, needle", [
    ("gpu", "unknown device 'gpu'"),
    ("cuda:x", "unknown device"),
    ("meta", "unsupported device"),
])
def test_bad_spellings_are_one_clear_error(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        resolve_device(spec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_unavailable_cuda_is_refused() -> None:
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_missing_cuda_index_is_refused() -> None:
    with pytest.raises(ConfigError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("change, needle", [
    ({"quantize": "int3"}, "quantize"),
    ({"group_size": 0}, "group_size"),
    ({"kv_cache_mb": 0}, "kv_cache_mb"),
    ({"kv_cache_mb": True}, "kv_cache_mb"),
    ({"block_size": 2.5}, "block_size"),
    ({"max_num_seqs": -1}, "max_num_seqs"),
    ({"max_queue": 0}, "max_queue"),
    ({"prefill_chunk": 0}, "prefill_chunk"),
    ({"dtype": "float64"}, "dtype"),
    ({"num_threads": 0}, "num_threads"),
    ({"moe_path": "scatter"}, "moe_path"),
    ({"batch_invariant": "yes"}, "batch_invariant"),
    ({"device": 3}, "device"),
])
def test_each_bad_setting_is_one_clear_error(change: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as e:
        EngineConfig(**change)  # type: ignore[arg-type]
    assert isinstance(e.value, ValueError) and isinstance(e.value, TrustmoeError)
    with pytest.raises(ConfigError, match=needle):
        EngineConfig().replace(**change)


def test_unknown_setting_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown engine setting 'kv_cache'.*kv_cache_mb"):
        EngineConfig().replace(kv_cache=4)


def test_every_field_has_a_default_and_help() -> None:
    cfg = EngineConfig()
    for f in dataclasses.fields(EngineConfig):
        assert f.default is not dataclasses.MISSING, f.name
        assert len(EngineConfig.help(f.name)) > 10, f.name
    assert cfg.device == "auto" and cfg.quantize is None and cfg.torch_dtype is None
    assert EngineConfig(dtype="bfloat16").torch_dtype == torch.bfloat16
