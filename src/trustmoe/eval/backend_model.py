"""The torch backend: the training module (`Transformer`) scored in padded batches.

Requests are sorted by length and right-padded; with causal attention padding never changes a
real position, so the batch size changes nothing beyond float noise. Multiple-choice requests
that share a context run as one packed forward pass per context (`packed.score_groups`).
This backend alone exposes hidden states, MoE routing and input gradients. Generation goes
through an `Engine` built on the same weights (one sampler for every path).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trustmoe.eval.lm import (
    LM,
    Capabilities,
    ContinuationRequest,
    GenerateRequest,
    Generation,
)
from trustmoe.eval.loglik import Request, Scored, check_requests, scored_slice, stats, to_host
from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from trustmoe.data.tokenizer import TextCodec
    from trustmoe.engine import Engine
    from trustmoe.eval.moe_diag import RoutingCollector
    from trustmoe.model.transformer import Transformer


class ModelLM(LM):
    kind = "model"

    def __init__(self, model: Transformer, codec: TextCodec | None, *, batch_size: int = 8,
                 temperature: float = 1.0, model_dir: Path | None = None) -> None:
        if batch_size < 1:
            raise TrustmoeError(f"batch size must be >= 1, got {batch_size}")
        if temperature <= 0:
            raise TrustmoeError(f"temperature must be > 0, got {temperature}")
        cfg = model.config
        prefix = None if codec is not None else (
            cfg.bos_token_id if cfg.bos_token_id is not None else cfg.eos_token_id)
        super().__init__(codec, cfg.max_position_embeddings, cfg.vocab_size,
                         Capabilities(hidden=True, routing=cfg.is_moe, gradients=True),
                         prefix_id=prefix)
        self.model, self.batch_size, self.temperature = model, batch_size, temperature
        self.model_dir = model_dir
        self._engine: Engine | None = None

    @classmethod
    def create(cls, model: Transformer | str | Path, *, tokenizer: Tokenizer | str | Path | None
               = None, batch_size: int = 8, temperature: float = 1.0,
               device: str | None = None) -> ModelLM:
        """From a model dir (its tokenizer and config give the codec) or a `Transformer`."""
        from trustmoe.data.tokenizer import TextCodec

        model_dir = None
        if isinstance(model, str | Path):
            from trustmoe.model.hf import load

            model_dir = Path(model)
            m = load(model_dir, device=device)
        else:
            m = model
        cfg = m.config
        codec: TextCodec | None = None
        if tokenizer is None and model_dir is not None and (model_dir / "tokenizer.json").exists():
            codec = TextCodec.from_dir(model_dir, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
        elif isinstance(tokenizer, str | Path):
            codec = TextCodec.from_dir(tokenizer, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
        elif tokenizer is not None:
            codec = TextCodec.create(tokenizer, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
        return cls(m, codec, batch_size=batch_size, temperature=temperature, model_dir=model_dir)

    # ------------------------------------------------------------ scoring

    def loglikelihood(self, requests: Sequence[ContinuationRequest], *,
                      routing: RoutingCollector | None = None,
                      on_batch: Callable[[int], None] | None = None) -> list[Scored]:
        """Requests sharing a context (multiple-choice items) run packed, one pass per context;
        the others in padded batches (`score_requests`)."""
        if self.temperature != 1.0:
            return super().loglikelihood(requests, routing=routing, on_batch=on_batch)
        from trustmoe.eval.packed import score_groups

        groups: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(requests):
            if not r.continuation:
                raise TrustmoeError(f"request {i} has an empty continuation")
            groups.setdefault(tuple(r.context), []).append(i)
        shared = [k for k, v in groups.items() if len(v) > 1]
        single = [v[0] for v in groups.values() if len(v) == 1]
        out: list[Scored | None] = [None] * len(requests)
        if shared:
            packed = score_groups(
                self.model, [(list(k), [requests[i].continuation for i in groups[k]])
                             for k in shared], prefix=self.prefix_id,
                batch_size=self.batch_size, routing=routing, on_batch=on_batch)
            for k, per in zip(shared, packed, strict=True):
                for i, s in zip(groups[k], per, strict=True):
                    out[i] = s
        if single:
            alone = super().loglikelihood([requests[i] for i in single], routing=routing,
                                          on_batch=on_batch)
            for i, s in zip(single, alone, strict=True):
                out[i] = s
        return [s for s in out if s is not None]

    def score(self, requests: Sequence[Request], *, hidden: bool = False, logits: bool = False,
              routing: RoutingCollector | None = None,
              on_batch: Callable[[int], None] | None = None) -> list[Scored]:
        return score_requests(self.model, requests, batch_size=self.batch_size,
                              return_hidden=hidden, return_logits=logits,
                              temperature=self.temperature, routing=routing, on_batch=on_batch)

    def routing_collector(self) -> RoutingCollector | None:
        from trustmoe.eval.moe_diag import RoutingCollector

        return RoutingCollector(self.model)

    # ------------------------------------------------------------ generation

    def generate_until(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        from trustmoe.engine import Engine

        if self._engine is None:  # the engine's sampler on these very weights
            self._engine = Engine(self.model, tokenizer=self.codec.tokenizer if self.codec
                                  else None)
        return engine_generate(self._engine, requests, self.prefix_id)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dir": str(self.model_dir) if self.model_dir else None,
                "quantize": None, "device": str(self.model.device)}


def engine_generate(engine: Engine, requests: Sequence[GenerateRequest], prefix: int
                    ) -> list[Generation]:
    """Greedy `generate_until` through an engine (ids in, text and ids out)."""
    from trustmoe.engine import SamplingParams

    if not requests:
        return []
    prompts = [[prefix, *r.context] for r in requests]
    params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, stop=r.stop or None)
              for r in requests]
    res = engine.generate(prompts, params=params)
    return [Generation(g.text, list(g.token_ids), g.finish_reason) for g in res]


# ---------------------------------------------------------------- padded batches


@torch.no_grad()
def score_requests(
    model: Transformer,
    requests: Sequence[Request],
    *,
    batch_size: int = 8,
    return_hidden: bool = False,
    return_logits: bool = False,
    temperature: float = 1.0,
    routing: RoutingCollector | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Scored]:
    """Score requests in length-sorted, right-padded batches; results in request order."""
    if batch_size < 1:
        raise TrustmoeError(f"batch size must be >= 1, got {batch_size}")
    if temperature <= 0:
        raise TrustmoeError(f"temperature must be > 0, got {temperature}")
    check_requests(requests, model.config.max_position_embeddings)
    device = model.device
    order = sorted(range(len(requests)), key=lambda i: (-len(requests[i].ids), i))
    results: list[Scored | None] = [None] * len(requests)
    was_training = model.training
    model.eval()
    try:
        for b0 in range(0, len(order), batch_size):
            idxs = order[b0:b0 + batch_size]
            _score_batch(model, requests, idxs, results, device, return_hidden, return_logits,
                         temperature, routing)
            if on_batch is not None:
                on_batch(len(idxs))
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


def _score_batch(
    model: Transformer, requests: Sequence[Request], idxs: list[int],
    results: list[Scored | None], device: torch.device, return_hidden: bool,
    return_logits: bool, temperature: float, routing: RoutingCollector | None,
) -> None:
    T = max(len(requests[i].ids) for i in idxs)
    B = len(idxs)
    idx = torch.zeros(B, T, dtype=torch.long)  # (B, T) right-padded (the pad id is never read)
    real = torch.zeros(B, T, dtype=torch.bool)  # (B, T)
    for row, i in enumerate(idxs):
        ids = requests[i].ids
        idx[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        real[row, : len(ids)] = True
    idx, real = idx.to(device), real.to(device)
    if routing is not None:
        routing.set_mask(real.flatten())
    out = model.run(idx, return_hidden=return_hidden)
    if routing is not None:
        routing.set_mask(None)
    # gather every scored position of the batch into one (n_total, V) block
    rows, cols, spans = [], [], []
    for row, i in enumerate(idxs):
        r = requests[i]
        pos = torch.arange(r.start - 1, len(r.ids) - 1)  # positions whose next token is scored
        rows.append(torch.full_like(pos, row))
        cols.append(pos)
        spans.append(pos.numel())
    rr, cc = torch.cat(rows).to(device), torch.cat(cols).to(device)
    logits = out.logits[rr, cc]  # (n_total, V)
    targets = idx[rr, cc + 1]  # (n_total,)
    host = to_host(stats(logits, targets, temperature))
    hid = out.hidden_states[rr, cc].double().cpu() if out.hidden_states is not None else None
    tg = targets.cpu().numpy()
    off = 0
    for i, n in zip(idxs, spans, strict=True):
        sl = slice(off, off + n)
        results[i] = scored_slice(
            host, tg, sl, hidden=hid[sl].mean(0).numpy() if hid is not None and n else None,
            logits=logits[sl].float().cpu() if return_logits else None)
        off += n
