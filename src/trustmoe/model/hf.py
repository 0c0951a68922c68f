"""Hugging Face interop: our model directory IS a Hugging Face model directory.

Writes `config.json` (model_type mixtral, or llama when dense), `model.safetensors` with HF
parameter names (per-expert w1/w2/w3, the layout transformers 4.x and 5.x and llama.cpp read),
`generation_config.json`, `tokenizer.json` and `trustmoe.json`. Reads any Mixtral or Llama
directory written by `save_pretrained` (single or sharded safetensors, legacy or fused expert
tensors). Pickle files are never loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from trustmoe.config import ConfigError, ModelConfig
from trustmoe.io import TrustmoeError, atomic_write_json, read_json
from trustmoe.model.transformer import Transformer
from trustmoe.security.integrity import check_on_load, write_manifest

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TRUSTMOE_EXTRAS = (
    "shared_expert_intermediate_size", "capacity_factor", "norm_topk_prob",
    "router_aux_loss_coef", "router_z_loss_coef",
)


class ModelLoadError(TrustmoeError):
    pass


# ---------------------------------------------------------------- config


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    arch, mtype = ("MixtralForCausalLM", "mixtral") if cfg.is_moe else ("LlamaForCausalLM", "llama")
    d: dict[str, Any] = {
        "architectures": [arch],
        "model_type": mtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if cfg.is_moe:
        d.update(
            num_local_experts=cfg.num_local_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            output_router_logits=False,
            sliding_window=None,
        )
    else:
        d.update(mlp_bias=False, pretraining_tp=1)
    return d


_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                  "num_local_experts", "num_experts_per_tok")


def config_from_hf(d: dict[str, Any], extras: dict[str, Any] | None = None) -> ModelConfig:
    mtype = d.get("model_type")
    if mtype not in ("mixtral", "llama"):
        raise ModelLoadError(f"unsupported model_type {mtype!r}: trustmoe loads 'mixtral' and 'llama'")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ModelLoadError(f"rope type {rope_type!r} is not supported (only default RoPE)")
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ModelLoadError("models with attention or MLP biases are not supported")
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    kw: dict[str, Any] = dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"), max_position_embeddings=d.get("max_position_embeddings", 2048),
        rope_theta=theta, rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        bos_token_id=d.get("bos_token_id"), eos_token_id=eos,
    )
    if mtype == "mixtral":
        kw.update(num_local_experts=d.get("num_local_experts", 8),
                  num_experts_per_tok=d.get("num_experts_per_tok", 2))
        if "router_aux_loss_coef" in d:
            kw["router_aux_loss_coef"] = d["router_aux_loss_coef"]
    else:
        kw.update(num_local_experts=1, num_experts_per_tok=1)
    for k in TRUSTMOE_EXTRAS:
        if extras and k in extras:
            kw[k] = extras[k]
    for k in _POSITIVE_INTS:  # fuzzed configs: wrong types must not reach torch as shapes
        v = kw.get(k)
        if (v is not None or k != "head_dim") and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ModelLoadError(f"config.json field {k} must be a positive integer, got {v!r}")
    try:
        kw["rope_theta"] = float(kw["rope_theta"])
        return ModelConfig(**kw)
    except (ConfigError, TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json describes an impossible model: {e}") from None


# ---------------------------------------------------------------- weights


def hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """The model's tensors under the Hugging Face Mixtral/Llama names `model.safetensors` uses.

    Detached views on the model's device (no copy): one tensor per expert matrix
    (`...block_sparse_moe.experts.{e}.w1.weight`, w3, w2), `lm_head.weight` absent when tied.
    This is also the naming the engine reads (`trustmoe.engine.weights`).
    """
    cfg = model.config
    out: dict[str, Tensor] = {}
    h = cfg.intermediate_size
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[name] = t
            continue
        if name.startswith("rotary."):
            continue
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.(w13|w2)", name)
        if m:
            i, which = m.groups()
            base = f"model.layers.{i}.block_sparse_moe.experts"
            for e in range(cfg.num_local_experts):
                if which == "w13":
                    out[f"{base}.{e}.w1.weight"] = t[e, :h]
                    out[f"{base}.{e}.w3.weight"] = t[e, h:]
                else:
                    out[f"{base}.{e}.w2.weight"] = t[e]
            continue
        if cfg.is_moe:
            name = name.replace(".mlp.", ".block_sparse_moe.")
        out[f"model.{name}"] = t
    return {k: v.detach() for k, v in out.items()}


def to_hf_state_dict(model: Transformer) -> dict[str, Tensor]:
    """`hf_state_dict` as contiguous CPU tensors, ready for `safetensors.save_file`."""
    return {k: v.contiguous().cpu() for k, v in hf_state_dict(model).items()}


def canonical_hf_names(sd: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Any Hugging Face layout we read -> the one naming of `hf_state_dict` (views, no copy).

    transformers 5 keeps MoE layers in memory as `model.layers.{i}.mlp.gate.weight` and fused
    `mlp.experts.gate_up_proj` (E, 2h, d) / `mlp.experts.down_proj` (E, d, h); on disk (and
    here) they are `block_sparse_moe.gate.weight` and per-expert w1/w3/w2.
    """
    out: dict[str, Tensor] = {}
    h = cfg.intermediate_size
    for name, t in sd.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\."
                         r"(gate_up_proj|down_proj)", name)
        if m:
            base = f"model.layers.{m.group(1)}.block_sparse_moe.experts"
            for e in range(t.shape[0]):
                if m.group(2) == "gate_up_proj":
                    out[f"{base}.{e}.w1.weight"], out[f"{base}.{e}.w3.weight"] = t[e, :h], t[e, h:]
                else:
                    out[f"{base}.{e}.w2.weight"] = t[e]
            continue
        if cfg.is_moe:
            name = name.replace(".mlp.", ".block_sparse_moe.")
        out[name] = t
    return out


def from_hf_state_dict(sd: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF names (legacy per-expert or fused v5 tensors) -> our state dict."""
    ours: dict[str, Tensor] = {}
    experts: dict[tuple[int, int, str], Tensor] = {}
    for name, t in canonical_hf_names(sd, cfg).items():
        n = name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
        m = re.fullmatch(r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(w1|w2|w3)\.weight", n)
        if m:
            experts[(int(m.group(1)), int(m.group(2)), m.group(3))] = t
            continue
        ours[n] = t
    for i in range(cfg.num_hidden_layers):
        if (i, 0, "w1") not in experts:
            continue
        try:
            w1 = [experts[(i, e, "w1")] for e in range(cfg.num_local_experts)]
            w3 = [experts[(i, e, "w3")] for e in range(cfg.num_local_experts)]
            w2 = [experts[(i, e, "w2")] for e in range(cfg.num_local_experts)]
        except KeyError as err:
            layer, e, w = err.args[0]
            raise ModelLoadError(
                f"missing tensor model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"
            ) from None
        ours[f"layers.{i}.mlp.w13"] = torch.cat([torch.stack(w1), torch.stack(w3)], dim=1)
        ours[f"layers.{i}.mlp.w2"] = torch.stack(w2)
    if cfg.tie_word_embeddings:
        ours.pop("lm_head.weight", None)
    return ours


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "safetensors index").get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ModelLoadError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    if (path / "quantization.json").exists():
        raise ModelLoadError(
            f"{path} holds quantized weights: load it with trustmoe.engine.Engine (or `trustmoe serve`)"
        )
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"refusing to load pickle weights {pickles[0]}: trustmoe only loads safetensors "
            "(pickle files can run arbitrary code). Convert them with a trusted tool first."
        )
    raise ModelLoadError(f"no model.safetensors in {path}")


def read_safetensors(path: Path) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    from trustmoe.security.safetensors_check import check_file

    for f in _weight_files(path):
        check_file(f)  # header validated before any tensor is read (raises HeaderError)
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sd[k] = st.get_tensor(k)
        except Exception as e:  # safetensors raises several types for corrupt headers
            raise ModelLoadError(f"cannot read {f}: {e}") from None
    return sd


# ---------------------------------------------------------------- save / load


def save_model(
    model: Transformer,
    out_dir: str | Path,
    tokenizer_file: str | Path | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write a complete HF-format model directory into `out_dir` (caller makes it atomic)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    save_file(to_hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(out / "config.json", hf_config_dict(cfg))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
           "do_sample": False, "max_new_tokens": 256}
    atomic_write_json(out / "generation_config.json", gen)
    if tokenizer_file is not None and Path(tokenizer_file).resolve() != (out / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    meta = dict(metadata or {})
    meta["model_extras"] = {k: getattr(cfg, k) for k in TRUSTMOE_EXTRAS}
    atomic_write_json(out / "trustmoe.json", meta)
    tok_cfg = Path(tokenizer_file).parent / "tokenizer_config.json" if tokenizer_file else None
    if tok_cfg is not None and tok_cfg.exists() and tok_cfg.resolve() != (out / tok_cfg.name).resolve():
        shutil.copyfile(tok_cfg, out / "tokenizer_config.json")  # the chat template travels along
    write_manifest(out)  # last: every file of the dir, by SHA-256


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    cfg_json = read_json(path / "config.json", "model config")
    extras = {}
    if (path / "trustmoe.json").exists():
        extras = read_json(path / "trustmoe.json", "trustmoe.json").get("model_extras", {})
    try:
        return config_from_hf(cfg_json, extras)
    except KeyError as e:
        raise ModelLoadError(f"{path / 'config.json'} lacks required field {e}") from None


def load(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """Load an HF-format Mixtral/Llama directory (ours or transformers') as a Transformer."""
    path = Path(path)
    cfg = load_config(path)
    _weight_files(path)  # pickle-only dirs are refused by name first
    check_on_load(path, "model")  # refuses a changed, missing, extra or symlinked file
    sd = from_hf_state_dict(read_safetensors(path), cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v for k, v in model.state_dict().items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ModelLoadError(f"{path}: missing tensor {missing[0]} ({len(missing)} missing in all)")
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ModelLoadError(
                f"{path}: tensor {k} has shape {tuple(sd[k].shape)}, config expects {tuple(v.shape)}"
            )
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise ModelLoadError(f"{path}: unexpected tensor {unexpected[0]} ({len(unexpected)} in all)")
    model = model.to_empty(device=device or "cpu")
    model.load_state_dict(sd, strict=False, assign=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.reset(model.embed_tokens.weight.device)  # its tables were made on meta
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def read_metadata(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "trustmoe.json"
    return json.loads(p.read_text()) if p.exists() else {}
