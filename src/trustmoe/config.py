"""Typed configuration and named presets.

`ModelConfig` uses Hugging Face Mixtral/Llama field names so that `config.json` round-trips
without a translation table; our own extras (shared expert, capacity factor, z-loss) are
stored in `trustmoe.json` and default to off. `EngineConfig` holds every inference-engine
setting; `resolve_device` is the one device rule. (No torch import here: the CLI reads these
defaults before torch, and its OpenMP settings, load.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    import torch


class ConfigError(TrustmoeError, ValueError):
    """A configuration value that cannot work (raised with one clear message)."""


AUTO_DEVICE = "auto"


def resolve_device(spec: str | None = AUTO_DEVICE) -> torch.device:
    """The one device rule for training, evaluation, generation and the engine.

    "auto" (or None / "") -> "cuda" when CUDA is available, else "cpu"; otherwise "cpu",
    "cuda", "cuda:N" or "mps", which must exist on this machine. Anything else raises
    ConfigError with one clear message.
    """
    import torch

    if spec is None or spec.strip() in ("", AUTO_DEVICE):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec.strip())
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {spec!r} requested but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {spec!r} requested but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {spec!r} requested but MPS is not available here")
    elif dev.type != "cpu":
        raise ConfigError(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    return dev


@dataclass
class ModelConfig:
    """The model's shape and options (Hugging Face field names; `trustmoe.json` for extras).

    Training-only options — they change nothing at inference: `capacity_factor` (tokens
    beyond an expert's capacity are dropped only while the module is in `train()` mode;
    `eval()`, the engine and its C kernels are dropless everywhere), `router_aux_loss_coef`
    and `router_z_loss_coef` (loss terms). Every other field is part of the function the
    model computes, and the engine honours each one (tests/engine/test_parity_matrix.py).
    """

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 512  # per expert (SwiGLU hidden width)
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    num_local_experts: int = 8  # 1 -> dense Llama model
    num_experts_per_tok: int = 2
    norm_topk_prob: bool = True  # renormalise the top-k weights (Mixtral does)
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # trustmoe extras, off by default
    shared_expert_intermediate_size: int = 0  # >0 adds a sigmoid-gated shared expert (Qwen2-MoE)
    capacity_factor: float | None = None  # None -> dropless; else drop tokens beyond capacity
    router_aux_loss_coef: float = 0.01  # Switch load-balancing loss
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss

    def __post_init__(self) -> None:
        self.validate()

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 1

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "num_local_experts",
            "num_experts_per_tok", "max_position_embeddings",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ConfigError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                f"num_local_experts ({self.num_local_experts})"
            )
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError(f"capacity_factor must be > 0, got {self.capacity_factor}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def dense_twin(self) -> ModelConfig:
        """A dense (Llama) model with the same active FFN parameters per token."""
        width = self.intermediate_size * self.num_experts_per_tok
        width += self.shared_expert_intermediate_size
        return self.replace(
            num_local_experts=1, num_experts_per_tok=1, intermediate_size=width,
            shared_expert_intermediate_size=0, capacity_factor=None,
        )

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; `active=True` counts only the experts a token uses."""
        d, h = self.hidden_size, self.head_size
        attn = d * h * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        experts = self.num_experts_per_tok if active else self.num_local_experts
        ffn = experts * 3 * d * self.intermediate_size
        if self.is_moe:
            ffn += d * self.num_local_experts
        if self.shared_expert_intermediate_size:
            ffn += 3 * d * self.shared_expert_intermediate_size + d
        layer = attn + ffn + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + emb + d


SERVER_MAX_CONCURRENCY = 256  # requests (choices) in flight in one server; more get 429
QUANT_MODES = ("int8", "int4")
DTYPES = ("float32", "bfloat16", "float16")
KV_DTYPES = ("float32", "float16")
MOE_PATHS = ("auto", "sorted", "gather")


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class EngineConfig:
    """Every engine setting, its default and its meaning, declared once.

    `Engine(model, EngineConfig(...))`, `Engine(model, quantize="int8")` (keyword overrides
    are field names), the `trustmoe serve` / `trustmoe quantize` options and
    `trustmoe.serve.app.build_engine` all take their defaults and help text from here.
    """

    quantize: str | None = _f(None, "Weight-only quantization at load: None, 'int8' (per output "
                                    "channel) or 'int4' (group-wise).")
    group_size: int = _f(64, "int4 group size: input channels per scale and zero point.")
    kv_cache_mb: float = _f(256.0, "Paged KV-cache memory budget in MiB.")
    kv_cache_dtype: str | None = _f(None, "KV-cache element type: None (the weights' dtype, exact) "
                                          "or float16 (half the memory and the decode reads at "
                                          "long contexts; keys and values rounded to fp16, as "
                                          "llama.cpp's default cache).")
    block_size: int = _f(16, "Tokens per KV-cache block (the unit of prefix caching).")
    max_num_seqs: int = _f(32, "Most sequences in one running batch.")
    max_queue: int = _f(256, "Most requests waiting for a batch slot; more are refused "
                             "(QueueFullError; HTTP 429).")
    prefill_chunk: int = _f(256, "Most prompt tokens run per step (long prompts are split).")
    device: str = _f(AUTO_DEVICE, "auto (cuda when available, else cpu; for a Transformer its own "
                                  "device), cpu, cuda or cuda:N.")
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
    features: bool = _f(False, "Emit each request's monitoring features (trustmoe.engine.features) "
                               "from its prefill: final hidden-state mean, expert routing counts, "
                               "NLL/entropy/top-1 at up to 16 prompt positions.")

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
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_DTYPES:
            raise ConfigError(f"kv_cache_dtype must be None or one of {', '.join(KV_DTYPES)}, "
                              f"got {self.kv_cache_dtype!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be None or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.num_threads is not None and (isinstance(self.num_threads, bool) or not isinstance(
                self.num_threads, int) or self.num_threads < 1):
            raise ConfigError(f"num_threads must be a positive integer, got {self.num_threads!r}")
        if self.moe_path not in MOE_PATHS:
            raise ConfigError(f"moe_path must be one of {', '.join(MOE_PATHS)}, got {self.moe_path!r}")
        for name in ("batch_invariant", "enable_prefix_caching", "fast_decode", "exact_int8",
                     "features"):
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
        import torch

        return None if self.dtype is None else getattr(torch, self.dtype)

    def resolve_device(self) -> torch.device:
        return resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)



@dataclass
class TrainConfig:
    batch_size: int = 8  # sequences per micro-batch (per process)
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    max_steps: int = 1000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    checkpoint_every: int = 200
    seed: int = 1337
    dtype: str = "auto"  # auto | float32 | bfloat16 (autocast)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Preset:
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    description: str = ""


def _presets() -> dict[str, Preset]:
    tiny = ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256,
    )
    small = ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=1024,
    )
    bench_small = small.replace(vocab_size=8192)
    bench_medium = ModelConfig(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=2048,
    )
    tiny_train = TrainConfig(batch_size=4, seq_len=64, warmup_steps=5, max_steps=50,
                             eval_every=25, eval_batches=2, checkpoint_every=25, lr=3e-3)
    small_train = TrainConfig(batch_size=8, seq_len=256, warmup_steps=30, max_steps=2000,
                              eval_every=100, eval_batches=4, checkpoint_every=200, lr=2e-3)
    return {
        "tiny": Preset(tiny, tiny_train, "2-layer, 4 experts top-2; for tests"),
        "tiny-dense": Preset(tiny.dense_twin(), tiny_train, "dense twin of tiny"),
        "small": Preset(small, small_train, "4-layer, 8 experts top-2; the demo model"),
        "small-dense": Preset(small.dense_twin(), small_train, "dense twin of small"),
        "bench-small": Preset(bench_small, small_train, "shared/bench-shapes.json bench-small"),
        "bench-medium": Preset(bench_medium, small_train, "shared/bench-shapes.json bench-medium"),
    }


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    """Return a fresh copy of a named preset, or raise ConfigError listing the known ones."""
    if name not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise ConfigError(f"unknown preset {name!r}; choose one of: {known}")
    p = PRESETS[name]
    return Preset(dataclasses.replace(p.model), dataclasses.replace(p.train), p.description)
