"""One narrow interface between the metrics and whatever computes log-probabilities.

In the spirit of lm-evaluation-harness's `LM` (`api/model.py`), every metric talks to three
request types, so any backend can be measured, including the one that answers users:

- `loglikelihood([ContinuationRequest(context, continuation)])`: log p(continuation | BOS +
  context), per token, with the distribution summaries of `Scored`;
- `loglikelihood_rolling(docs)`: every token of whole documents, in sliding windows;
- `generate_until([GenerateRequest(context, max_tokens, stop)])`: greedy continuations.

Requests are token ids without BOS; the LM puts its model's BOS (`TextCodec.prefix_id`) in
front, so every backend scores exactly the same sequences. Backends (`open_lm`):

| backend | what it measures | exact distribution | hidden states / routing / gradients |
| --- | --- | --- | --- |
| `model` (`backend_model.ModelLM`) | the torch training module | yes | yes / yes / yes |
| `engine` (`backend_engine.EngineLM`) | `trustmoe serve`'s engine, fp32/int8/int4 | yes | no / no / no |
| `openai` (`backend_openai.OpenAILM`) | any OpenAI-compatible server | top-k estimate | no / no / no |

`Capabilities` says which; the runner reports what a backend could not measure in eval.json
instead of failing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmoe.eval.loglik import Request, Scored, continuation_requests, join, rolling_requests
from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from trustmoe.data.tokenizer import TextCodec
    from trustmoe.eval.moe_diag import RoutingCollector

BACKENDS = ("model", "engine", "openai")


@dataclass(frozen=True)
class Capabilities:
    exact: bool = True  # the full next-token distribution (else summaries estimated from top-k)
    logit_scale: bool = True  # raw logits (max_logit, lse); log-probabilities alone lack them
    hidden: bool = False  # final hidden states (Mahalanobis / KNN OOD scores)
    routing: bool = False  # per-token MoE routing (routing diagnostics)
    gradients: bool = False  # gradients w.r.t. input tokens (the white-box attack)
    top_k: int | None = None  # alternatives per position when not exact

    def limits(self) -> dict[str, str]:
        """What this backend cannot give, and what the evaluation does about it."""
        out: dict[str, str] = {}
        if not self.exact:
            out["distribution"] = (
                f"only the top-{self.top_k} log-probabilities per position: entropy, max "
                "probability, sum of p², Var[log p] and the temperature fit are estimated with the "
                "remaining mass spread evenly over the rest of the vocabulary")
        if not self.logit_scale:
            out["logit_scale"] = ("log-probabilities do not fix the logits' scale: the max-logit "
                                  "and energy OOD scores are not computed")
        if not self.hidden:
            out["hidden"] = ("no hidden states: the Mahalanobis and KNN OOD scores are not "
                             "computed (use --backend model)")
        if not self.routing:
            out["routing"] = "no routing decisions: MoE routing diagnostics are not computed"
        if not self.gradients:
            out["gradients"] = ("no gradients: the token-substitution attack is the black-box "
                                "variant (random candidate swaps scored by log-likelihood)")
        return out


@dataclass
class ContinuationRequest:
    context: list[int]  # token ids, without BOS (may be empty)
    continuation: list[int]  # token ids to score, non-empty


@dataclass
class GenerateRequest:
    context: list[int]  # token ids, without BOS
    max_tokens: int
    stop: list[str] = field(default_factory=list)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str


class LM(ABC):
    """An evaluation backend: three request types over one scoring primitive, `score`."""

    kind: str = "lm"

    def __init__(self, codec: TextCodec | None, max_length: int, vocab_size: int,
                 caps: Capabilities, prefix_id: int | None = None) -> None:
        self.codec = codec
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.caps = caps
        p = prefix_id if prefix_id is not None else (codec.prefix_id if codec else None)
        self._prefix = p

    @property
    def prefix_id(self) -> int:
        """The model's BOS (else EOS): the token every scored sequence starts with."""
        if self._prefix is None:
            raise TrustmoeError("the model names no BOS or EOS token (config.json "
                                "bos_token_id / eos_token_id, or the tokenizer's): cannot "
                                "start a document")
        return self._prefix

    # ------------------------------------------------------------ the three request types

    def loglikelihood(self, requests: Sequence[ContinuationRequest], *,
                      routing: RoutingCollector | None = None,
                      on_batch: Callable[[int], None] | None = None) -> list[Scored]:
        reqs = continuation_requests([(r.context, r.continuation) for r in requests],
                                     self.max_length, self.prefix_id)
        return self.score(reqs, routing=routing, on_batch=on_batch)

    def loglikelihood_rolling(
        self, docs: Sequence[Sequence[int]], *, max_len: int | None = None,
        stride: int | None = None, hidden: bool = False, logits: bool = False,
        routing: RoutingCollector | None = None, on_batch: Callable[[int], None] | None = None,
    ) -> list[Scored]:
        """Every token of each document, scored once, with windows of `max_len` tokens."""
        L = min(max_len or self.max_length, self.max_length)
        if L < 2:
            raise TrustmoeError(f"max_len must be at least 2, got {L}")
        S = stride or max(1, L // 2)
        if not 1 <= S <= L - 1:
            raise TrustmoeError(f"stride must be in 1..{L - 1} (max_len - 1), got {S}")
        reqs: list[Request] = []
        owner: list[int] = []
        for i, ids in enumerate(docs):
            if not ids:
                raise TrustmoeError(f"text {i} is empty: nothing to score")
            for r in rolling_requests(list(ids), L, S, self.prefix_id):
                reqs.append(r)
                owner.append(i)
        scored = self.score(reqs, hidden=hidden, logits=logits, routing=routing,
                            on_batch=on_batch)
        grouped: list[list[Scored]] = [[] for _ in docs]
        for o, s in zip(owner, scored, strict=True):
            grouped[o].append(s)
        return [join(g) for g in grouped]

    @abstractmethod
    def generate_until(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        """Greedy continuations of BOS + context, stopped at EOS, a stop string or max_tokens."""

    # ------------------------------------------------------------ what a backend provides

    @abstractmethod
    def score(self, requests: Sequence[Request], *, hidden: bool = False, logits: bool = False,
              routing: RoutingCollector | None = None,
              on_batch: Callable[[int], None] | None = None) -> list[Scored]:
        """Score `ids[start:]` of each request; results in request order. `hidden`, `logits`
        and `routing` are honoured where `caps` says so and ignored elsewhere."""

    def routing_collector(self) -> RoutingCollector | None:
        """A collector for `routing=` when this backend exposes MoE routing, else None."""
        return None

    def describe(self) -> dict[str, Any]:
        """What was evaluated, for eval.json's `backend` section."""
        return {"kind": self.kind, "max_length": self.max_length, "vocab_size": self.vocab_size,
                "exact_distribution": self.caps.exact, "top_logprobs": self.caps.top_k,
                "prefix_token_id": self._prefix, "limits": self.caps.limits()}

    def close(self) -> None:  # noqa: B027 (most backends hold nothing to release)
        """Release what the backend holds (threads, connections)."""

    def __enter__(self) -> LM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_lm(backend: str, *, model_dir: Path | None = None, quantize: str | None = None,
            model_url: str | None = None, tokenizer: Path | None = None,
            device: str | None = None, batch_size: int = 16, top_logprobs: int = 20,
            api_key: str | None = None, served_model: str | None = None) -> LM:
    """The LM a `trustmoe eval` command line names."""
    if backend not in BACKENDS:
        raise TrustmoeError(f"--backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if quantize not in (None, "int8", "int4"):
        raise TrustmoeError(f"--quantize must be int8 or int4, not {quantize!r}")
    if backend == "openai":
        from trustmoe.eval.backend_openai import OpenAILM

        if model_url is None:
            raise TrustmoeError("the openai backend needs --model-url http://host/v1")
        if quantize is not None:
            raise TrustmoeError("--quantize applies to the engine backend; a server quantizes "
                                "its own weights")
        tok_dir = tokenizer or model_dir
        if tok_dir is None:
            raise TrustmoeError("--model-url needs --tokenizer DIR (the served model's "
                                "tokenizer.json, config.json)")
        return OpenAILM.connect(model_url, tok_dir, model=served_model, api_key=api_key,
                                top_logprobs=top_logprobs, batch_size=batch_size)
    if model_dir is None:
        raise TrustmoeError(f"the {backend} backend needs a model directory")
    if backend == "model":
        from trustmoe.eval.backend_model import ModelLM

        if quantize is not None:
            raise TrustmoeError("--quantize needs --backend engine (quantized weights are an "
                                "engine layout)")
        return ModelLM.create(Path(model_dir), tokenizer=tokenizer, batch_size=batch_size,
                              device=device)
    from trustmoe.eval.backend_engine import EngineLM

    return EngineLM.from_dir(Path(model_dir), quantize=quantize, device=device,
                             batch_size=batch_size, tokenizer=tokenizer)
