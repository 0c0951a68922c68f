"""Log-likelihood requests/s: trustmoe.eval's LM interface vs a one-request-at-a-time loop.

Two workloads of random token ids (speed does not depend on the weights), both sent through
`LM.loglikelihood` of the torch backend (`ModelLM`), as every metric sends them:
- independent: each request a context of 16..192 tokens and a continuation of 1..12 tokens;
  length-sorted, padded batches (`score_requests`) vs the loop.
- multiple choice: items of one context and 4 continuations (the shape of lm-eval MC tasks);
  packed shared-context scoring (`score_groups`) vs the loop over all requests.
The engine backend (`EngineLM`, what `trustmoe serve` runs; the default of `trustmoe eval`)
scores the same requests too ("engine_backend": its numbers must agree, and its speed is
reported against the torch backend's; each of its rounds starts from an empty prefix cache).
All paths run on the same model and requests, interleaved round by round in one process, so
machine noise hits them alike; the JSON reports medians, ratios, and the largest difference
between the paths' summed log-likelihoods (they must agree). If `lm_eval` is importable, its HF backend (`HFLM`) scores
the same token requests too; it is not installed by this project (its dependencies are heavy),
and the field says so when absent.

    python benchmarks/eval_throughput.py                 # ~1-2 min on 2 cores
    python benchmarks/eval_throughput.py --quick         # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trustmoe.config import get_preset
from trustmoe.eval.backend_model import ModelLM
from trustmoe.eval.lm import LM, ContinuationRequest
from trustmoe.eval.loglik import Request, continuation_requests
from trustmoe.model.transformer import Transformer

BOS = 0


def make_requests(n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ctx = rng.integers(3, vocab, int(rng.integers(16, 193))).tolist()
        cont = rng.integers(3, vocab, int(rng.integers(1, 13))).tolist()
        out.append((ctx, cont))
    return out


@torch.no_grad()
def one_at_a_time(model: Transformer, reqs: list[Request]) -> list[float]:
    """The naive loop: one forward per request, full log-softmax, gather the continuation."""
    out = []
    for r in reqs:
        ids = torch.tensor([r.ids])
        logp = model(ids)[0].float().log_softmax(-1)  # (T, V)
        tgt = ids[0, r.start:]
        out.append(float(logp[r.start - 1:-1].gather(1, tgt[:, None]).sum()))
    return out


def engine_backend(model: Transformer, batch_size: int) -> LM:
    """The engine backend on the same weights (what `trustmoe serve` would run)."""
    from trustmoe.engine import Engine
    from trustmoe.eval.backend_engine import EngineLM

    # the settings `trustmoe eval --backend engine` uses, on the module's device
    return EngineLM(Engine(model, **EngineLM.engine_options(model.config, batch_size)))


def lm_eval_backend(model: Transformer, batch_size: int, workdir: str) -> Any:
    """lm-evaluation-harness's HF backend (transformers' Mixtral) on a saved copy, if installed."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return None
    from trustmoe.data.tokenizer import save_tokenizer, train_tokenizer
    from trustmoe.model.hf import save_model

    save_model(model, workdir)  # requests are token ids; the tokenizer only satisfies HFLM's init
    save_tokenizer(train_tokenizer(["a b c d e f g"] * 10, 300), Path(workdir))
    return HFLM(pretrained=workdir, batch_size=batch_size, device=str(model.device))


def lm_eval_score(lm: Any, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
    reqs = [(("", ""), [0, *ctx], cont) for ctx, cont in pairs]
    return [float(ll) for ll, _greedy in lm._loglikelihood_tokens(reqs, disable_tqdm=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny preset, 24 requests, 2 rounds")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-engine", dest="engine", action="store_false",
                    help="skip the engine backend's reference figures")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.requests, args.rounds = "tiny", 24, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_preset(args.preset).model.replace(bos_token_id=BOS, eos_token_id=BOS)
    model = Transformer(cfg).to(args.device).eval()
    lm = ModelLM(model, None, batch_size=args.batch_size)
    pairs = make_requests(args.requests, cfg.vocab_size, 0)
    reqs = continuation_requests(pairs, cfg.max_position_embeddings, BOS)
    items = make_requests(args.requests // 4, cfg.vocab_size, 1)  # contexts
    conts = make_requests(4 * len(items), cfg.vocab_size, 2)
    groups = [(ctx, [conts[4 * i + j][1] for j in range(4)]) for i, (ctx, _) in enumerate(items)]
    mc_pairs = [(g[0], c) for g in groups for c in g[1]]
    mc_reqs = continuation_requests(mc_pairs, cfg.max_position_embeddings, BOS)
    ind = [ContinuationRequest(c, x) for c, x in pairs]
    mc = [ContinuationRequest(c, x) for c, x in mc_pairs]
    lm.loglikelihood(ind[:4])  # warm-up
    lm.loglikelihood(mc[:8])
    one_at_a_time(model, reqs[:2])
    eng = engine_backend(model, args.batch_size) if args.engine else None
    t: dict[str, list[float]] = {"ours": [], "naive": [], "packed": [], "mc_naive": []}
    if eng is not None:
        eng.loglikelihood(ind[:4])  # warm-up
        t.update(engine=[], mc_engine=[])
    eng_diff = 0.0
    workdir = tempfile.mkdtemp()
    peer_lm = lm_eval_backend(model, args.batch_size, workdir)
    lm_diff = 0.0
    if peer_lm is not None:
        t.update(lm_eval=[], mc_lm_eval=[])
        lm_eval_score(peer_lm, pairs[:2])  # warm-up
    max_diff = 0.0
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        ours = lm.loglikelihood(ind)
        t["ours"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        naive = one_at_a_time(model, reqs)
        t["naive"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        packed = lm.loglikelihood(mc)
        t["packed"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mc_naive = one_at_a_time(model, mc_reqs)
        t["mc_naive"].append(time.perf_counter() - t0)
        if eng is not None:
            # every round from an empty prefix cache: the same requests were scored the round
            # before, and reusing those blocks would measure the cache, not the scoring
            eng.engine.pool.reset_prefix_cache()
            t0 = time.perf_counter()
            e_ind = eng.loglikelihood(ind)
            t["engine"].append(time.perf_counter() - t0)
            eng.engine.pool.reset_prefix_cache()
            t0 = time.perf_counter()
            e_mc = eng.loglikelihood(mc)
            t["mc_engine"].append(time.perf_counter() - t0)
            eng_diff = max(eng_diff, *(abs(a.total - b.total) for a, b in
                                       zip([*ours, *packed], [*e_ind, *e_mc], strict=True)))
        if peer_lm is not None:
            t0 = time.perf_counter()
            lm_lls = lm_eval_score(peer_lm, pairs)
            t["lm_eval"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            lm_eval_score(peer_lm, mc_pairs)
            t["mc_lm_eval"].append(time.perf_counter() - t0)
            lm_diff = max(lm_diff, *(abs(a.total - b) for a, b in zip(ours, lm_lls, strict=True)))
        max_diff = max(max_diff, *(abs(a.total - b) for a, b in zip(ours, naive, strict=True)),
                       *(abs(a.total - b) for a, b in zip(packed, mc_naive, strict=True)))
    rps = {k: len(reqs if k in ("ours", "naive", "lm_eval", "engine") else mc_reqs)
           / statistics.median(v) for k, v in t.items()}
    peer: dict[str, Any] = {"available": False,
                            "note": "lm_eval is not importable; not compared (not a dependency)"}
    if peer_lm is not None:
        peer = {
            "available": True,
            "independent_requests_per_s": round(rps["lm_eval"], 2),
            "multiple_choice_requests_per_s": round(rps["mc_lm_eval"], 2),
            "trustmoe_speedup_independent": round(rps["ours"] / rps["lm_eval"], 3),
            "trustmoe_speedup_multiple_choice": round(rps["packed"] / rps["mc_lm_eval"], 3),
            "max_abs_loglik_diff_vs_trustmoe": lm_diff,
        }
    print(json.dumps({
        "benchmark": "eval_throughput",
        "preset": args.preset, "device": args.device, "threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "rounds": args.rounds,
        "independent": {
            "requests": len(reqs), "tokens": sum(len(r.ids) for r in reqs),
            "trustmoe_requests_per_s": round(rps["ours"], 2),
            "one_at_a_time_requests_per_s": round(rps["naive"], 2),
            "speedup_vs_one_at_a_time": round(rps["ours"] / rps["naive"], 3),
        },
        "multiple_choice": {
            "items": len(groups), "requests": len(mc_reqs),
            "trustmoe_packed_requests_per_s": round(rps["packed"], 2),
            "one_at_a_time_requests_per_s": round(rps["mc_naive"], 2),
            "speedup_vs_one_at_a_time": round(rps["packed"] / rps["mc_naive"], 3),
        },
        "max_abs_loglik_diff": max_diff,
        "engine_backend": {"measured": False} if eng is None else {
            "measured": True,
            "independent_requests_per_s": round(rps["engine"], 2),
            "multiple_choice_requests_per_s": round(rps["mc_engine"], 2),
            # engine backend vs the torch backend (`trustmoe`): > 1 is faster
            "speed_vs_model_backend_independent": round(rps["engine"] / rps["ours"], 3),
            "speed_vs_model_backend_multiple_choice": round(rps["mc_engine"] / rps["packed"], 3),
            "max_abs_loglik_diff_vs_model_backend": eng_diff,
        },
        "lm_eval_hf": peer,
    }, indent=2))


if __name__ == "__main__":
    main()
