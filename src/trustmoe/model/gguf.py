"""Export a model directory to GGUF in the layout llama.cpp reads for Llama and Mixtral.

llama.cpp runs Mixtral under the `llama` architecture: the expert matrices of a layer are
stacked into one 3-D tensor each (`ffn_gate_exps` = HF w1, `ffn_up_exps` = w3, `ffn_down_exps`
= w2), the router is `ffn_gate_inp`. Its RoPE rotates adjacent pairs while Hugging Face
rotates halves, so the q/k projection rows are permuted on the way out exactly as
`convert_hf_to_gguf.py` does (`LlamaModel.permute`). The byte-level BPE tokenizer is written
as a "gpt2" tokenizer: tokens in id order, merges, token types, BOS/EOS ids.

`read_gguf_state` reads a file back (dequantising) for tests and tools.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustmoe.io import TrustmoeError, require_extra
from trustmoe.model.hf import load, load_config

QUANT_TYPES = ("f32", "f16", "q8_0")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half row order -> llama.cpp interleaved-pair row order. w: (n_head*hd, d)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`. w: (n_head*hd, d)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _tokenizer_fields(model_dir: Path) -> dict[str, Any]:
    """Token list, types and merges of a byte-level BPE tokenizer.json ("gpt2" in GGUF)."""
    path = model_dir / "tokenizer.json"
    if not path.exists():
        raise TrustmoeError(f"{model_dir} has no tokenizer.json; GGUF needs the tokenizer")
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrustmoeError(f"cannot read {path}: {e}") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise TrustmoeError(
            f"GGUF export supports byte-level BPE tokenizers, got {model.get('type')!r}")
    if model.get("byte_fallback") or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise TrustmoeError("GGUF export writes byte-level BPE (\"gpt2\") tokenizers; this "
                            "tokenizer is SentencePiece-style (Metaspace / byte fallback)")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["content"]: t for t in tj.get("added_tokens") or []}
    for content, t in added.items():
        vocab[content] = t["id"]
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [TOKEN_USER_DEFINED] * n
    for tok, i in vocab.items():
        tokens[i] = tok
        if tok in added:
            types[i] = TOKEN_CONTROL if added[tok].get("special") else TOKEN_USER_DEFINED
        else:
            types[i] = TOKEN_NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"tokens": tokens, "types": types, "merges": merges}


def export_gguf(model_dir: str | os.PathLike[str], out_path: str | os.PathLike[str],
                quantize: str = "f32", progress: Any = None) -> dict[str, Any]:
    """Write `out_path` (atomically). quantize: f32 | f16 | q8_0 (2-D weights only)."""
    gguf = require_extra("gguf", "export", "GGUF export")

    if quantize not in QUANT_TYPES:
        raise TrustmoeError(f"--quantize must be one of {', '.join(QUANT_TYPES)}, got {quantize!r}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = load_config(model_dir)
    if cfg.shared_expert_intermediate_size:
        raise TrustmoeError("llama.cpp's llama architecture has no shared expert; cannot export")
    if cfg.is_moe and not cfg.norm_topk_prob:
        raise TrustmoeError("llama.cpp renormalises the top-k router weights; this model does not")
    tok = _tokenizer_fields(model_dir)
    model = load(model_dir, dtype=torch.float32)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if len(tok["tokens"]) > cfg.vocab_size:
        raise TrustmoeError(
            f"tokenizer has {len(tok['tokens'])} tokens > vocab_size {cfg.vocab_size}")
    tok["tokens"] += [f"[PAD{i}]" for i in range(len(tok["tokens"]), cfg.vocab_size)]
    tok["types"] += [TOKEN_USER_DEFINED] * (cfg.vocab_size - len(tok["types"]))

    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[quantize]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantize]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(model_dir.resolve().name)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_size)
    w.add_value_length(cfg.head_size)
    w.add_rope_dimension_count(cfg.head_size)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.is_moe:
        w.add_expert_count(cfg.num_local_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else _find(tok, "<|endoftext|>")
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else eos
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    template = _chat_template(model_dir)
    if template:
        w.add_chat_template(template)

    tensors = list(_gguf_tensors(sd, cfg))
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        t = qtype if arr.ndim >= 2 and not name.endswith("ffn_gate_inp.weight") else None
        if t == gguf.GGMLQuantizationType.Q8_0 and arr.shape[-1] % 32:
            t = gguf.GGMLQuantizationType.F32  # q8_0 blocks are 32 wide
        if t is None or t == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, arr)
        elif t == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, t), raw_dtype=t)
        if progress is not None:
            progress(name)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(out_path), "quantize": quantize, "tensors": len(tensors),
            "bytes": out_path.stat().st_size, "architecture": "llama",
            "experts": cfg.num_local_experts}


def _find(tok: dict[str, Any], s: str) -> int | None:
    return tok["tokens"].index(s) if s in tok["tokens"] else None


def _chat_template(model_dir: Path) -> str | None:
    p = model_dir / "tokenizer_config.json"
    if not p.exists():
        return None
    try:
        t = json.loads(p.read_text(encoding="utf-8")).get("chat_template")
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return t if isinstance(t, str) else None


def _gguf_tensors(sd: dict[str, np.ndarray], cfg: Any) -> Any:
    """Our state dict -> (gguf name, array in torch (out, in) order) pairs."""
    yield "token_embd.weight", sd["embed_tokens.weight"]  # (V, d)
    yield "output_norm.weight", sd["norm.weight"]  # (d,)
    if not cfg.tie_word_embeddings:
        yield "output.weight", sd["lm_head.weight"]  # (V, d)
    h = cfg.intermediate_size
    for i in range(cfg.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        yield b + "attn_norm.weight", sd[p + "input_layernorm.weight"]
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        yield b + "attn_q.weight", permute_qk(q, cfg.num_attention_heads)  # (H*hd, d)
        yield b + "attn_k.weight", permute_qk(k, cfg.num_key_value_heads)  # (Hkv*hd, d)
        yield b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"]
        yield b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"]
        yield b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]
        if cfg.is_moe:
            w13 = sd[p + "mlp.w13"]  # (E, 2h, d)
            yield b + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"]  # (E, d)
            yield b + "ffn_gate_exps.weight", w13[:, :h]  # (E, h, d)
            yield b + "ffn_up_exps.weight", w13[:, h:]  # (E, h, d)
            yield b + "ffn_down_exps.weight", sd[p + "mlp.w2"]  # (E, d, h)
        else:
            yield b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]
            yield b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"]
            yield b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"]


def read_gguf_state(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(metadata fields, tensors dequantised to float32 in torch (out, in) order)."""
    gguf = require_extra("gguf", "export", "reading GGUF")

    r = gguf.GGUFReader(str(path))
    meta: dict[str, Any] = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            meta[name] = field.contents()
        except Exception:  # unusual field kinds: keep the raw parts
            meta[name] = None
    tensors: dict[str, np.ndarray] = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists dims innermost first
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.asarray(arr, dtype=np.float32).reshape(shape)
    return meta, tensors
