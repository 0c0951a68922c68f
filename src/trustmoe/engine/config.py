"""Every engine setting, its default and its meaning, declared once.

`Engine(model, EngineConfig(...))`, `Engine(model, quantize="int8")` (keyword overrides are
field names), `trustmoe serve` / `trustmoe quantize` options and `serve.app.build_engine` all
read their defaults and help text from here, so they cannot drift apart.

    cfg = EngineConfig(quantize="int8", kv_cache_mb=512)
    cfg = cfg.replace(max_num_seqs=64)      # validated again
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from trustmoe.config import AUTO_DEVICE, ConfigError, resolve_device
from trustmoe.engine.quantize import QUANT_MODES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MOE_PATHS = ("auto", "sorted", "gather")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class EngineConfig:
    quantize: str | None = _f(None, "Weight-only quantization at load: None, 'int8' (per output "
                                    "channel) or 'int4' (group-wise).")
    group_size: int = _f(64, "int4 group size: input channels per scale and zero point.")
    kv_cache_mb: float = _f(256.0, "Paged KV-cache memory budget in MiB.")
    block_size: int = _f(16, "Tokens per KV-cache block (the unit of prefix caching).")
    max_num_seqs: int = _f(32, "Most sequences in one running batch.")
    max_queue: int = _f(256, "Most requests waiting for a batch slot; more are refused "
                             "(QueueFullError; HTTP 429).")
    prefill_chunk: int = _f(256, "Most prompt tokens run per step (long prompts are split).")
    device: str = _f(AUTO_DEVICE, "auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
    dtype: str | None = _f(None, "Float weight dtype: None (float32 for a model directory, the "
                                 "module's own for a Transformer), float32, bfloat16 or float16.")
    batch_invariant: bool = _f(True, "A request gives the same bits alone or in any batch "
                                     "(False batches decode matmuls freely).")
    enable_prefix_caching: bool = _f(True, "Reuse the KV blocks of a shared prompt prefix.")
    num_threads: int | None = _f(None, "torch intra-op threads (process-wide); None keeps "
                                       "torch's. On a busy 2-core machine 1 avoids OpenMP "
                                       "spin-wait collapses.")
    fast_decode: bool = _f(True, "CPU decode rows through the whole-block C kernels (False: "
                                 "torch ops; TRUSTMOE_CPU_KERNELS=0 turns every compiled "
                                 "kernel off).")
    moe_path: str = _f("auto", "MoE dispatch: auto, sorted (experts read in place) or gather "
                               "(gather the chosen experts' weights; CUDA decode).")
    exact_int8: bool = _f(False, "Without the compiled CPU kernels: weight-only int8 numerics "
                                 "instead of fbgemm's dynamic activation quantization.")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first setting that cannot work."""
        if self.quantize not in (None, *QUANT_MODES):
            raise ConfigError(f"quantize must be None, 'int8' or 'int4', got {self.quantize!r}")
        for name in ("group_size", "block_size", "max_num_seqs", "max_queue", "prefill_chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(self.kv_cache_mb, bool) or not isinstance(self.kv_cache_mb, int | float) \
                or not self.kv_cache_mb > 0:
            raise ConfigError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb!r}")
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be a string such as 'auto', 'cpu' or 'cuda', "
                              f"got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be None or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.num_threads is not None and (isinstance(self.num_threads, bool) or not isinstance(
                self.num_threads, int) or self.num_threads < 1):
            raise ConfigError(f"num_threads must be a positive integer, got {self.num_threads!r}")
        if self.moe_path not in MOE_PATHS:
            raise ConfigError(f"moe_path must be one of {', '.join(MOE_PATHS)}, got {self.moe_path!r}")
        for name in ("batch_invariant", "enable_prefix_caching", "fast_decode", "exact_int8"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with `changes` (EngineConfig field names), validated."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(f"unknown engine setting {unknown[0]!r}; the settings are: "
                              f"{', '.join(self.field_names())}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def help(cls, name: str) -> str:
        """The help text of one setting (for CLI options)."""
        return str({f.name: f.metadata["help"] for f in dataclasses.fields(cls)}[name])

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else DTYPES[self.dtype]

    def resolve_device(self) -> torch.device:
        return resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


__all__ = ["DTYPES", "MOE_PATHS", "QUANT_MODES", "EngineConfig"]
