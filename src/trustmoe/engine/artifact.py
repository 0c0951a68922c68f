"""Model directories into the runner's layout, and quantized weights as their own artifact.

    save_quantized(engine.weights, "out/model-int8", source_dir="runs/demo/model")
    Engine("out/model-int8")          # loads the int8 weights directly, no float copy

`load_weights(dir)` reads either kind of directory straight into `RunnerWeights` (no
`Transformer` is built). A quantized directory keeps `config.json`, the tokenizer files and
`trustmoe.json` of the source, plus `quantization.json` ({"method": "int8"|"int4",
"group_size": g, "format": "trustmoe-quant-2", "source_sha256": ...}) and
`model.quant.safetensors`: the Hugging Face tensor names of `trustmoe.engine.weights`, each
matrix in its stored form (`NAME.q` int8 (N, K) + `NAME.scale` (N,); or `NAME.q4` uint8
(N, K/2) + `NAME.scale`, `NAME.zero` (N, K/g); float tensors under their plain name).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trustmoe.engine.weights import RunnerWeights, build_weights, weights_state_dict
from trustmoe.io import TrustmoeError, atomic_dir, atomic_write_json, read_json, sha256_file
from trustmoe.model.hf import canonical_hf_names, load_config, read_safetensors
from trustmoe.security.integrity import check_on_load, write_manifest
from trustmoe.security.safetensors_check import check_file

QUANT_FILE = "model.quant.safetensors"
META_FILE = "quantization.json"
FORMAT = "trustmoe-quant-2"
COPY_FILES = ("config.json", "generation_config.json", "tokenizer.json",
              "tokenizer_config.json", "trustmoe.json")


def is_quantized_dir(path: Path) -> bool:
    return (path / META_FILE).exists() and (path / QUANT_FILE).exists()


def save_quantized(w: RunnerWeights, out_dir: str | Path, source_dir: str | Path,
                   group_size: int = 64) -> Path:
    """Write the runner's (quantized) weights plus the source's config/tokenizer, atomically."""
    if w.quantize is None:
        raise TrustmoeError("these weights are not quantized; build them with quantize=int8|int4")
    src, out = Path(source_dir), Path(out_dir)
    sd = {k: (v.float() if v.is_floating_point() else v).detach().cpu().clone()  # own storage each
          for k, v in weights_state_dict(w).items()}
    with atomic_dir(out) as tmp:
        tmp = Path(tmp)
        for f in COPY_FILES:
            if (src / f).exists():
                shutil.copyfile(src / f, tmp / f)
        save_file(sd, str(tmp / QUANT_FILE), metadata={"format": "pt", "method": w.quantize})
        src_w = src / "model.safetensors"
        atomic_write_json(tmp / META_FILE, {
            "method": w.quantize, "group_size": group_size, "format": FORMAT,
            "source_sha256": sha256_file(src_w) if src_w.exists() else None,
        })
        write_manifest(tmp)  # last: every file of the quantized model dir, by SHA-256
    return out


def load_quantized(path: Path, device: torch.device, exact_int8: bool = False) -> RunnerWeights:
    meta = read_json(path / META_FILE, "quantization metadata")
    method = meta.get("method")
    if method not in ("int8", "int4"):
        raise TrustmoeError(f"{path / META_FILE}: unknown method {method!r}")
    if meta.get("format") != FORMAT:
        raise TrustmoeError(f"{path} is a quantized artifact of format {meta.get('format')!r}; this "
                            f"trustmoe reads {FORMAT!r}: re-create it with `trustmoe quantize`")
    cfg = load_config(path)
    check_on_load(path, "model")
    check_file(path / QUANT_FILE)  # header validated before any tensor is read
    try:
        with safe_open(str(path / QUANT_FILE), framework="pt") as f:
            st = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # corrupt header or truncated file
        raise TrustmoeError(f"cannot read {path / QUANT_FILE}: {e}") from None
    w = build_weights(st, cfg, None, int(meta.get("group_size", 64)), device, torch.float32,
                      exact_int8)
    w.quantize = method
    return w


def load_weights(path: str | Path, quantize: str | None = None, group_size: int = 64,
                 device: torch.device | None = None, dtype: torch.dtype | None = None,
                 exact_int8: bool = False) -> RunnerWeights:
    """A model directory — Hugging Face safetensors or a quantized artifact — as RunnerWeights."""
    path = Path(path)
    device = device or torch.device("cpu")
    if is_quantized_dir(path):
        w = load_quantized(path, device, exact_int8)
        if quantize is not None and quantize != w.quantize:
            raise TrustmoeError(f"{path} holds {w.quantize} weights; cannot apply {quantize}")
        return w
    cfg = load_config(path)
    state = canonical_hf_names(read_safetensors(path), cfg)
    return build_weights(state, cfg, quantize, group_size, device, dtype, exact_int8)


def quantize_model_dir(model_dir: str | Path, out_dir: str | Path, method: str = "int8",
                       group_size: int = 64) -> dict[str, object]:
    """Quantize an HF-format model directory into its own artifact; returns a JSON summary."""
    src = Path(model_dir)
    if method not in ("int8", "int4"):
        raise TrustmoeError(f"quantization method must be int8 or int4, got {method!r}")
    w = load_weights(src, method, group_size, torch.device("cpu"))
    out = save_quantized(w, out_dir, src, group_size)
    return {"path": str(out), "method": method, "group_size": group_size,
            "bytes": (out / QUANT_FILE).stat().st_size,
            "source_bytes": (src / "model.safetensors").stat().st_size
            if (src / "model.safetensors").exists() else None}
