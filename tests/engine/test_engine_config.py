"""EngineConfig: every setting declared once, validated with one clear error, used by Engine."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trustmoe.config import ConfigError
from trustmoe.engine import Engine, EngineConfig
from trustmoe.io import TrustmoeError
from trustmoe.model import Transformer


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


def test_engine_takes_a_config_and_keyword_overrides(tiny_model: Transformer) -> None:
    base = EngineConfig(kv_cache_mb=1, block_size=8, max_num_seqs=3, prefill_chunk=32)
    eng = Engine(tiny_model, base, max_queue=5, device="cpu")
    c = eng.engine_config
    assert (c.kv_cache_mb, c.block_size, c.max_num_seqs, c.max_queue, c.device) == (1, 8, 3, 5, "cpu")
    assert base.max_queue == 256  # the caller's config is not changed
    assert eng.block_size == 8 and eng.scheduler.max_num_seqs == 3 and eng.scheduler.max_queue == 5
    assert eng.scheduler.prefill_chunk == 32
    per_block = 2 * 2 * 2 * 8 * 16 * 4  # K and V, layers, kv heads, block, head dim, fp32
    assert eng.pool.num_blocks == 2**20 // per_block
    with pytest.raises(ConfigError, match="unknown engine setting"):
        Engine(tiny_model, bogus=1)
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        Engine(tiny_model, device="gpu")
