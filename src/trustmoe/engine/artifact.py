"""Quantized weights as their own artifact: a model directory with `model.quant.safetensors`.

    save_quantized(engine.weights, "out/model-int8", source_dir="runs/demo/model")
    Engine("out/model-int8")          # loads the int8 weights directly, no float copy

The directory keeps `config.json`, the tokenizer files and `trustmoe.json` of the source, plus
`quantization.json` ({"method": "int8"|"int4", "group_size": g, "source_sha256": ...}).
Tensors: `<name>.q` (int8 (N, K)) and `<name>.scale`, or `<name>.q4` (uint8 (N, K/2)),
`<name>.scale` and `<name>.zero` (N, K/g); float tensors keep their plain name.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trustmoe.engine.weights import LayerWeights, RunnerWeights, rope_tables
from trustmoe.io import TrustmoeError, atomic_dir, atomic_write_json, read_json, sha256_file
from trustmoe.model.quantize import FloatWeight, Int4Weight, Int8Weight, Weight
from trustmoe.security.integrity import check_on_load, write_manifest
from trustmoe.security.safetensors_check import check_file

QUANT_FILE = "model.quant.safetensors"
META_FILE = "quantization.json"
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "trustmoe.json")


def is_quantized_dir(path: Path) -> bool:
    return (path / META_FILE).exists() and (path / QUANT_FILE).exists()


def _put(sd: dict[str, torch.Tensor], name: str, w: Weight) -> None:
    if isinstance(w, Int8Weight):
        sd[f"{name}.q"], sd[f"{name}.scale"] = w.q.cpu(), w.scale.cpu()
    elif isinstance(w, Int4Weight):
        sd[f"{name}.q4"], sd[f"{name}.scale"] = w.packed.cpu(), w.scale.cpu()
        sd[f"{name}.zero"] = w.zero.cpu()
    else:
        sd[name] = w.dequantize().contiguous().cpu()


def _get(st: dict[str, torch.Tensor], name: str, group_size: int, exact: bool,
         device: torch.device) -> Weight:
    if f"{name}.q" in st:
        return Int8Weight(st[f"{name}.q"].to(device), st[f"{name}.scale"].to(device), exact)
    if f"{name}.q4" in st:
        return Int4Weight(st[f"{name}.q4"].to(device), st[f"{name}.scale"].to(device),
                          st[f"{name}.zero"].to(device), group_size)
    if name in st:
        return FloatWeight(st[name].to(device))
    raise TrustmoeError(f"quantized artifact lacks tensor {name}")


def save_quantized(w: RunnerWeights, out_dir: str | Path, source_dir: str | Path,
                   group_size: int = 64) -> Path:
    """Write the runner's (quantized) weights plus the source's config/tokenizer, atomically."""
    if w.quantize is None:
        raise TrustmoeError("these weights are not quantized; build them with quantize=int8|int4")
    src, out = Path(source_dir), Path(out_dir)
    sd: dict[str, torch.Tensor] = {"embed": w.embed.cpu().float(), "norm": w.norm.cpu().float()}
    _put(sd, "lm_head", w.lm_head)
    for i, lw in enumerate(w.layers):
        p = f"layers.{i}"
        sd[f"{p}.ln1"], sd[f"{p}.ln2"] = lw.ln1.cpu().float(), lw.ln2.cpu().float()
        _put(sd, f"{p}.wqkv", lw.wqkv)
        _put(sd, f"{p}.wo", lw.wo)
        for e, (a, b) in enumerate(zip(lw.w13, lw.w2, strict=True)):
            _put(sd, f"{p}.experts.{e}.w13", a)
            _put(sd, f"{p}.experts.{e}.w2", b)
        for nm in ("router", "shared13", "shared2", "shared_gate"):
            ww = getattr(lw, nm)
            if ww is not None:
                _put(sd, f"{p}.{nm}", ww)
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        for f in COPY_FILES:
            if (src / f).exists():
                shutil.copyfile(src / f, tmp / f)
        save_file(sd, str(tmp / QUANT_FILE), metadata={"format": "pt", "method": w.quantize})
        src_w = src / "model.safetensors"
        atomic_write_json(tmp / META_FILE, {
            "method": w.quantize, "group_size": group_size, "format": "trustmoe-quant-1",
            "source_sha256": sha256_file(src_w) if src_w.exists() else None,
        })
        write_manifest(tmp)  # last: every file of the quantized model dir, by SHA-256
    return out


def load_quantized(path: Path, device: torch.device, exact_int8: bool = False) -> RunnerWeights:
    from trustmoe.model.hf import load_config

    meta = read_json(path / META_FILE, "quantization metadata")
    method, gs = meta.get("method"), int(meta.get("group_size", 64))
    if method not in ("int8", "int4"):
        raise TrustmoeError(f"{path / META_FILE}: unknown method {method!r}")
    cfg = load_config(path)
    check_on_load(path, "model")
    check_file(path / QUANT_FILE)  # header validated before any tensor is read
    try:
        with safe_open(str(path / QUANT_FILE), framework="pt") as f:
            st = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # corrupt header or truncated file
        raise TrustmoeError(f"cannot read {path / QUANT_FILE}: {e}") from None

    def g(name: str) -> Weight:
        return _get(st, name, gs, exact_int8, device)

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}"
        E = cfg.num_local_experts if cfg.is_moe else 1
        lw = LayerWeights(
            ln1=st[f"{p}.ln1"].to(device), wqkv=g(f"{p}.wqkv"), wo=g(f"{p}.wo"),
            ln2=st[f"{p}.ln2"].to(device),
            router=g(f"{p}.router") if cfg.is_moe else None,
            w13=[g(f"{p}.experts.{e}.w13") for e in range(E)],
            w2=[g(f"{p}.experts.{e}.w2") for e in range(E)],
        )
        if cfg.shared_expert_intermediate_size:
            lw.shared13, lw.shared2 = g(f"{p}.shared13"), g(f"{p}.shared2")
            lw.shared_gate = g(f"{p}.shared_gate")
        layers.append(lw)
    cos, sin = rope_tables(cfg, device)
    return RunnerWeights(cfg=cfg, embed=st["embed"].to(device), layers=layers,
                         norm=st["norm"].to(device), lm_head=g("lm_head"), cos=cos, sin=sin,
                         dtype=torch.float32, quantize=method)


def quantize_model_dir(model_dir: str | Path, out_dir: str | Path, method: str = "int8",
                       group_size: int = 64) -> dict[str, object]:
    """Quantize an HF-format model directory into its own artifact; returns a JSON summary."""
    from trustmoe.engine.weights import build_weights
    from trustmoe.model.hf import load

    src = Path(model_dir)
    if method not in ("int8", "int4"):
        raise TrustmoeError(f"quantization method must be int8 or int4, got {method!r}")
    fp = build_weights(load(src, device="cpu"), method, group_size, torch.device("cpu"))
    out = save_quantized(fp, out_dir, src, group_size)
    return {"path": str(out), "method": method, "group_size": group_size,
            "bytes": (out / QUANT_FILE).stat().st_size,
            "source_bytes": (src / "model.safetensors").stat().st_size
            if (src / "model.safetensors").exists() else None}
