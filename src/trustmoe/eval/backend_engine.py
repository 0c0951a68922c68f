"""The engine backend: evaluate exactly what `trustmoe serve` runs (fp32, int8 or int4).

Each request goes to the engine as a prompt with `max_tokens=0` and
`SamplingParams(prompt_logprobs=0, prompt_logits=True)`: the engine's own forward pass (paged
KV cache, fused and quantized weights, its MoE paths) computes the logits at every prompt
position, and the summaries are taken from them with the same maths as the torch backend, so
fp32 numbers agree to float noise and int8/int4 numbers measure the quantized weights.
Requests are fed through `add_request`/`step` as the scheduler admits them (continuous
batching). Each asks only for the rows it scores (`prompt_logits_from=start`): the engine
computes no logits before them, and the full KV blocks of the unscored prefix may come from
the engine's prefix cache. Requests sharing a context (multiple-choice items) are submitted
leader first, the others once the leader's prefill is done, so the context is computed once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trustmoe.eval.backend_model import engine_generate
from trustmoe.eval.lm import LM, Capabilities, GenerateRequest, Generation
from trustmoe.eval.loglik import Request, Scored, check_requests, scored_slice, stats, to_host
from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from trustmoe.config import ModelConfig
    from trustmoe.data.tokenizer import TextCodec
    from trustmoe.engine import Engine
    from trustmoe.eval.moe_diag import RoutingCollector

_ids = count()


class EngineLM(LM):
    kind = "engine"

    def __init__(self, engine: Engine, *, codec: TextCodec | None = None,
                 model_dir: Path | None = None) -> None:
        if codec is None and engine.tokenizer is not None:
            codec = engine.codec
        cfg = engine.config
        prefix = None if codec is not None else (
            cfg.bos_token_id if cfg.bos_token_id is not None else engine.eos_token_id)
        super().__init__(codec, engine.max_model_len, cfg.vocab_size, Capabilities(),
                         prefix_id=prefix)
        self.engine, self.model_dir = engine, model_dir

    @classmethod
    def from_dir(cls, model_dir: Path, *, quantize: str | None = None, device: str | None = None,
                 batch_size: int = 16, tokenizer: Path | None = None) -> EngineLM:
        """An engine on a model dir (or a quantized artifact); `quantize` as `trustmoe serve`."""
        from trustmoe.data.tokenizer import TextCodec
        from trustmoe.engine import Engine
        from trustmoe.model.hf import load_config

        if batch_size < 1:
            raise TrustmoeError(f"batch size must be >= 1, got {batch_size}")
        cfg = load_config(model_dir)
        opts: dict[str, Any] = {"quantize": quantize, **cls.engine_options(cfg, batch_size)}
        if device not in (None, "auto"):
            opts["device"] = device
        try:
            engine = Engine(model_dir, **opts)
        except ValueError as e:
            raise TrustmoeError(f"cannot load {model_dir} into the engine: {e}") from None
        codec = None
        tok_dir = tokenizer or (model_dir if (model_dir / "tokenizer.json").exists() else None)
        if tok_dir is not None:
            codec = TextCodec.from_dir(tok_dir, bos_id=cfg.bos_token_id, eos_id=cfg.eos_token_id)
        return cls(engine, codec=codec, model_dir=model_dir)

    @staticmethod
    def engine_options(cfg: ModelConfig, batch_size: int) -> dict[str, Any]:
        """The `EngineConfig` overrides of a scoring engine: `batch_size` sequences at once, a
        prefill chunk longer than any window (a scored prompt is never cut), and a step budget
        of several windows (`prefill_chunk` is also the prompt tokens run per step), so a step
        prefills many short requests together."""
        return {"max_num_seqs": batch_size,
                "prefill_chunk": max(2048, 4 * cfg.max_position_embeddings)}

    @property
    def quantize(self) -> str | None:
        q = getattr(self.engine.weights, "quantize", None)
        return q if isinstance(q, str) else None

    def score(self, requests: Sequence[Request], *, hidden: bool = False, logits: bool = False,
              routing: RoutingCollector | None = None,
              on_batch: Callable[[int], None] | None = None) -> list[Scored]:
        from trustmoe.engine import QueueFullError, SamplingParams

        check_requests(requests, self.max_length)
        eng = self.engine
        base = f"eval-{next(_ids)}-"
        todo, followers = schedule_order(requests, eng.block_size)
        pending: dict[str, int] = {}
        results: list[Scored | None] = [None] * len(requests)
        while todo or pending:
            while todo:
                i = todo[0]
                # only the scored rows: the engine skips the others' logits, and the context's
                # full KV blocks may come from the prefix cache (filled by an earlier request)
                params = SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logits=True,
                                        prompt_logits_from=requests[i].start)
                try:
                    pending[eng.add_request(requests[i].ids, params, f"{base}{i}")] = i
                except QueueFullError:
                    break
                todo.popleft()
            for o in eng.step():
                if not o.finished or o.request_id not in pending:
                    continue
                i = pending.pop(o.request_id)
                # the context's blocks are cached now: the requests sharing them go next
                todo.extendleft(reversed(followers.pop(i, [])))
                if o.prompt_logits is None:
                    raise TrustmoeError(f"the engine returned no prompt logits for request {i}")
                r = requests[i]
                z = o.prompt_logits  # (n, V): rows predicting ids[start:]
                tgt = torch.tensor(r.ids[r.start:], dtype=torch.long, device=z.device)
                if z.shape[0] != tgt.shape[0]:
                    raise TrustmoeError(f"the engine returned {z.shape[0]} logit rows for "
                                        f"request {i}, which scores {tgt.shape[0]} tokens")
                results[i] = scored_slice(to_host(stats(z, tgt)), tgt.cpu().numpy(), slice(None),
                                          logits=z.float().cpu() if logits else None)
                if on_batch is not None:
                    on_batch(1)
        return [s for s in results if s is not None]

    def generate_until(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        return engine_generate(self.engine, requests, self.prefix_id)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dir": str(self.model_dir) if self.model_dir else None,
                "quantize": self.quantize, "device": str(self.engine.device)}


def schedule_order(requests: Sequence[Request], block_size: int
                   ) -> tuple[deque[int], dict[int, list[int]]]:
    """Submission order: requests whose unscored prefix shares full KV blocks (multiple-choice
    items: one context, several continuations) form a group; the first (its leader) is
    submitted at once, the others only after it finished, so they find the context's blocks in
    the prefix cache instead of computing them again. Returns (leaders and lone requests in
    request order, leader -> its followers)."""
    lead: dict[tuple[int, ...], int] = {}
    first: deque[int] = deque()
    followers: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        n = (r.start - 1) // block_size * block_size  # tokens in reusable full blocks
        if n == 0:
            first.append(i)
            continue
        j = lead.setdefault(tuple(r.ids[:n]), i)
        if j == i:
            first.append(i)
        else:
            followers.setdefault(j, []).append(i)
    return first, followers
