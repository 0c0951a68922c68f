"""GGUF export: llama.cpp's layout, checked by running the file the way llama.cpp does.

`llama_cpp_forward` is an independent reading of the GGUF tensors with llama.cpp's
semantics (interleaved-pair RoPE, `ffn_*_exps` stacks, softmax -> top-k -> renormalise), so a
missing q/k permutation or a swapped gate/up stack makes the logits disagree with ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trustmoe.io import TrustmoeError
from trustmoe.model.gguf import export_gguf, permute_qk, read_gguf_state, unpermute_qk
from trustmoe.model.hf import load


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope_pairs(x: torch.Tensor, base: float) -> torch.Tensor:
    # x: (T, H, hd); llama.cpp rope mode 0 rotates (x[2i], x[2i+1]) by pos * base^(-2i/hd)
    T, _, hd = x.shape
    inv = base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # (T, hd/2)
    cos, sin = ang.cos()[:, None].float(), ang.sin()[:, None].float()  # (T, 1, hd/2)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (T, H, hd/2, 2)
    return out.flatten(-2)


def llama_cpp_forward(meta: dict, t: dict[str, np.ndarray], ids: list[int]) -> torch.Tensor:
    """Logits (T, V) for one sequence, computed from GGUF tensors as llama.cpp would."""
    g = {k: torch.from_numpy(np.array(v)) for k, v in t.items()}
    L, H = meta["llama.block_count"], meta["llama.attention.head_count"]
    Hkv, eps = meta["llama.attention.head_count_kv"], meta["llama.attention.layer_norm_rms_epsilon"]
    base, k_used = meta["llama.rope.freq_base"], meta.get("llama.expert_used_count", 0)
    x = g["token_embd.weight"][ids]  # (T, d)
    T = x.shape[0]
    for i in range(L):
        b = f"blk.{i}."
        h = _rms(x, g[b + "attn_norm.weight"], eps)
        q = (h @ g[b + "attn_q.weight"].T).view(T, H, -1)
        k = (h @ g[b + "attn_k.weight"].T).view(T, Hkv, -1)
        v = (h @ g[b + "attn_v.weight"].T).view(T, Hkv, -1)
        q, k = _rope_pairs(q, base), _rope_pairs(k, base)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        att = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                             v.transpose(0, 1), is_causal=True)  # (H, T, hd)
        x = x + att.transpose(0, 1).reshape(T, -1) @ g[b + "attn_output.weight"].T
        h = _rms(x, g[b + "ffn_norm.weight"], eps)
        if b + "ffn_gate_inp.weight" in g:
            probs = (h @ g[b + "ffn_gate_inp.weight"].T).softmax(-1)  # (T, E)
            w, sel = probs.topk(k_used, dim=-1)
            w = w / w.sum(-1, keepdim=True)
            out = torch.zeros_like(h)
            for tok in range(T):
                for j in range(k_used):
                    e = int(sel[tok, j])
                    a = F.silu(g[b + "ffn_gate_exps.weight"][e] @ h[tok])
                    a = a * (g[b + "ffn_up_exps.weight"][e] @ h[tok])
                    out[tok] += w[tok, j] * (g[b + "ffn_down_exps.weight"][e] @ a)
        else:
            a = F.silu(h @ g[b + "ffn_gate.weight"].T) * (h @ g[b + "ffn_up.weight"].T)
            out = a @ g[b + "ffn_down.weight"].T
        x = x + out
    x = _rms(x, g["output_norm.weight"], eps)
    return x @ g.get("output.weight", g["token_embd.weight"]).T


IDS = [5, 17, 300, 42, 7, 99, 256, 3, 11, 64]


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_dense_dir"])
def test_gguf_f32_runs_like_our_model(which: str, request: pytest.FixtureRequest,
                                      tmp_path: Path) -> None:
    model_dir: Path = request.getfixturevalue(which)
    out = tmp_path / "m.gguf"
    info = export_gguf(model_dir, out)
    assert out.exists() and info["bytes"] == out.stat().st_size
    meta, tensors = read_gguf_state(out)
    assert meta["general.architecture"] == "llama"
    model = load(model_dir)
    cfg = model.config
    assert meta["llama.block_count"] == cfg.num_hidden_layers
    assert meta["llama.embedding_length"] == cfg.hidden_size
    if cfg.is_moe:
        assert meta["llama.expert_count"] == cfg.num_local_experts
        assert tensors["blk.0.ffn_gate_exps.weight"].shape == (
            cfg.num_local_experts, cfg.intermediate_size, cfg.hidden_size)
        assert tensors["blk.0.ffn_down_exps.weight"].shape == (
            cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
    with torch.no_grad():
        ours = model(torch.tensor([IDS]))[0]  # (T, V)
    ref = llama_cpp_forward(meta, tensors, IDS)
    torch.testing.assert_close(ref, ours, atol=1e-4, rtol=1e-4)


def test_without_permutation_the_logits_differ(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The check above can fail: undo the q/k permutation and llama.cpp's reading is wrong."""
    out = tmp_path / "m.gguf"
    export_gguf(tiny_model_dir, out)
    meta, t = read_gguf_state(out)
    H, Hkv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    for i in range(meta["llama.block_count"]):
        t[f"blk.{i}.attn_q.weight"] = unpermute_qk(t[f"blk.{i}.attn_q.weight"], H)
        t[f"blk.{i}.attn_k.weight"] = unpermute_qk(t[f"blk.{i}.attn_k.weight"], Hkv)
    with torch.no_grad():
        ours = load(tiny_model_dir)(torch.tensor([IDS]))[0]
    assert (llama_cpp_forward(meta, t, IDS) - ours).abs().max() > 1e-2


def test_permutation_round_trips() -> None:
    w = np.arange(8 * 6 * 3, dtype=np.float32).reshape(8 * 6, 3)
    assert np.array_equal(unpermute_qk(permute_qk(w, 6), 6), w)
    assert not np.array_equal(permute_qk(w, 6), w)


def test_gguf_tokenizer_matches_tokenizer_json(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    export_gguf(tiny_model_dir, out)
    meta, _ = read_gguf_state(out)
    tj = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    tokens = meta["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.model"] == "gpt2"
    for tok, i in tj["model"]["vocab"].items():
        assert tokens[i] == tok
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    assert meta["tokenizer.ggml.merges"] == merges
    assert tokens[0] == "<|endoftext|>" and meta["tokenizer.ggml.token_type"][0] == 3
    assert meta["tokenizer.ggml.eos_token_id"] == 0
    assert "im_start" in meta["tokenizer.chat_template"]


def test_gguf_q8_0_close_to_f32(tiny_model_dir: Path, tmp_path: Path) -> None:
    export_gguf(tiny_model_dir, tmp_path / "f.gguf")
    info = export_gguf(tiny_model_dir, tmp_path / "q.gguf", quantize="q8_0")
    assert info["bytes"] < 0.5 * (tmp_path / "f.gguf").stat().st_size
    meta, t = read_gguf_state(tmp_path / "q.gguf")
    _, f = read_gguf_state(tmp_path / "f.gguf")
    for name in ("blk.0.attn_q.weight", "blk.1.ffn_down_exps.weight", "output.weight"):
        err = np.linalg.norm(t[name] - f[name]) / np.linalg.norm(f[name])
        assert 0 < err < 0.01, (name, err)  # 8-bit blocks of 32: quantised, yet close
    with torch.no_grad():
        ours = load(tiny_model_dir)(torch.tensor([IDS]))[0]
    ref = llama_cpp_forward(meta, t, IDS)
    rel = ((ref - ours).norm() / ours.norm()).item()
    assert rel < 0.1, rel  # random weights amplify the error through the layers


def test_gguf_bad_input(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(TrustmoeError, match="not found"):
        export_gguf(tmp_path / "missing", tmp_path / "x.gguf")
    with pytest.raises(TrustmoeError, match="quantize"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", quantize="q3_k")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_export_gguf(tiny_model_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from trustmoe.cli import app

    out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(app, ["export", "gguf", str(tiny_model_dir), str(out), "--json",
                                 "--quantize", "f16"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output.strip().splitlines()[-1])
    assert info["path"] == str(out) and info["quantize"] == "f16" and out.exists()
    r = CliRunner().invoke(app, ["export", "gguf", str(tmp_path / "nope"), str(out)])
    assert isinstance(r.exception, TrustmoeError) and "not found" in str(r.exception)
    r = CliRunner().invoke(app, ["export", "gguf", "--help"])
    assert r.exit_code == 0 and "llama.cpp" in r.output


def test_llama_cpp_greedy_tokens_match(tiny_model_dir: Path, tmp_path: Path) -> None:
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed; llama.cpp greedy-token parity not run")
    out = tmp_path / "m.gguf"
    export_gguf(tiny_model_dir, out)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, verbose=False, logits_all=False)
    prompt = IDS[:6]
    got: list[int] = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got.append(int(tok))
        if len(got) == 12:
            break
    model = load(tiny_model_dir)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def test_gguf_refuses_sentencepiece_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "sp"
    shutil.copytree(tiny_model_dir, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["model"]["byte_fallback"] = True
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(TrustmoeError, match="SentencePiece"):
        export_gguf(d, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
