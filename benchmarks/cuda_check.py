"""CUDA check: the same code paths as on CPU, run on a GPU, compared against the CPU.

Run on a machine with a GPU (CI has none):  PYTHONPATH=src python benchmarks/cuda_check.py
Prints JSON: training on CUDA (bf16 autocast) learns; logits on CUDA match CPU in fp32;
greedy decoding gives the same tokens; the engine (when importable) agrees; step timings.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustmoe.config import get_preset
from trustmoe.data.shards import write_shard
from trustmoe.data.tokenizer import eos_id, save_tokenizer, train_tokenizer
from trustmoe.model import Transformer, load, save_model
from trustmoe.train import train


def make_data(out: Path) -> Path:
    rng = random.Random(0)
    words = "def class return import for while if else self value items range print".split()
    docs = ["\n".join(f"    {rng.choice(words)} = {rng.choice(words)}({rng.randint(0, 99)})"
                      for _ in range(rng.randint(3, 9))) for _ in range(400)]
    tok = train_tokenizer(docs, 512)
    save_tokenizer(tok, out)
    ids = np.concatenate([np.asarray([*tok.encode(d).ids, eos_id(tok)]) for d in docs])
    cut = len(ids) * 9 // 10
    write_shard(out / "train.bin", ids[:cut], 512)
    write_shard(out / "val.bin", ids[cut:], 512)
    return out


def check_training(work: Path) -> dict[str, Any]:
    data = make_data(work / "data")
    res = train(data, work / "model", "tiny", max_steps=40, device="cuda", progress=False,
                overrides={"batch_size": 8, "seq_len": 64, "eval_every": 20})
    meta = json.loads((work / "model" / "trustmoe.json").read_text())
    return {"steps": res.steps, "first_loss": res.losses[0], "last_loss": res.losses[-1],
            "learned": res.losses[-1] < res.losses[0] - 1.0, "bf16_autocast": meta["bf16"],
            "val_loss": res.val_loss}


@torch.no_grad()
def greedy(model: Transformer, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """The model's own greedy continuation (full recompute each step): prompt (1, P) -> (1, P+n)."""
    x = prompt
    for _ in range(n):
        x = torch.cat([x, model.run(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


def check_parity(work: Path) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    save_model(Transformer(get_preset("small").model), work / "small")
    cpu, gpu = load(work / "small"), load(work / "small", device="cuda")
    x = torch.randint(0, cpu.config.vocab_size, (2, 64))
    with torch.no_grad():
        diff = (cpu(x) - gpu(x.cuda()).cpu()).abs().max().item()
    prompt = x[:1, :8]
    a = greedy(cpu, prompt, 24)[0].tolist()
    b = greedy(gpu, prompt.cuda(), 24)[0].tolist()
    out: dict[str, Any] = {"max_abs_logit_diff_fp32": diff, "logits_match_1e-3": diff < 1e-3,
                           "greedy_tokens_equal": a == b}
    try:
        from trustmoe.engine import Engine
    except ImportError as e:  # engine not present in this checkout
        out["engine"] = f"skipped: {e}"
        return out
    prompts = [prompt[0].tolist(), x[1, :5].tolist()]
    e_cpu = Engine(work / "small", device="cpu").generate(prompts, max_tokens=16)
    e_gpu = Engine(work / "small", device="cuda").generate(prompts, max_tokens=16)
    out["engine_greedy_equal_cpu_gpu"] = [r.token_ids for r in e_cpu] == [r.token_ids for r in e_gpu]
    out["engine_matches_simple_loop"] = e_gpu[0].token_ids == b[8:8 + 16]
    return out


def check_engine(work: Path) -> dict[str, Any]:
    """Engine on CUDA: batch invariance, quantized paths, and decode speed vs transformers."""
    from trustmoe.engine import Engine

    out: dict[str, Any] = {}
    torch.manual_seed(0)
    cfg = get_preset("bench-small").model
    save_model(Transformer(cfg), work / "bs")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, cfg.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 40, (16,), generator=g)]
    eng = Engine(work / "bs", device="cuda")
    out["moe_path"] = eng.runner.moe_path if hasattr(eng, "runner") else "?"
    alone = eng.generate(prompts[:1], max_tokens=24)[0].token_ids
    batch = eng.generate(prompts, max_tokens=24)
    out["batch_invariant_alone_vs_16"] = alone == batch[0].token_ids
    for q in ("int8", "int4"):
        try:
            r = Engine(work / "bs", device="cuda", quantize=q).generate(prompts[:2], max_tokens=8)
            out[f"{q}_runs"] = all(len(x.token_ids) == 8 for x in r)
        except Exception as e:  # report, keep going
            out[f"{q}_runs"] = f"{type(e).__name__}: {e}"

    def tps(fn: Any, n_tok: int) -> float:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return n_tok / (time.perf_counter() - t)

    n = 64
    out["engine_tok_s_batch1"] = tps(lambda: eng.generate(prompts[:1], max_tokens=n, ignore_eos=True), n)
    out["engine_tok_s_batch16"] = tps(lambda: eng.generate(prompts, max_tokens=n, ignore_eos=True), 16 * n)
    try:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(work / "bs", dtype=torch.float32).cuda().eval()
        ids = torch.tensor([prompts[0]], device="cuda")

        def hf_gen() -> None:
            with torch.no_grad():
                hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        out["transformers_tok_s_batch1"] = tps(hf_gen, n)
        out["ratio_batch1"] = out["engine_tok_s_batch1"] / out["transformers_tok_s_batch1"]
    except Exception as e:  # transformers missing or failing: say so
        out["transformers"] = f"skipped: {type(e).__name__}: {e}"
    return out


def time_train_step(preset: str = "bench-small", bf16: bool = True) -> dict[str, Any]:
    cfg = get_preset(preset).model
    model = Transformer(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randint(0, cfg.vocab_size, (8, 256), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model.run(x, x).loss
        assert loss is not None
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 20
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    return {"preset": preset, "bf16": bf16, "s_per_step": dt, "tokens_per_s": 8 * 256 / dt}


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        sys.exit(1)
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, fn in (("training", check_training), ("parity", check_parity),
                         ("engine", check_engine)):
            try:
                report[name] = fn(work)
            except Exception as e:  # report every check, even after one fails
                report[name] = {"error": f"{type(e).__name__}: {e}"}
        report["train_step"] = [time_train_step(bf16=False), time_train_step(bf16=True)]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
