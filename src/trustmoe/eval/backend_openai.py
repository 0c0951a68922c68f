"""The OpenAI-compatible backend: evaluate any server that speaks `/v1/completions`.

`trustmoe eval --model-url http://host/v1 --tokenizer DIR` scores through the legacy
completions API exactly as lm-evaluation-harness's `local-completions` model does: prompts are
sent as token ids (so the server cannot tokenize differently), with `echo=True,
max_tokens=1, logprobs=k, temperature=0`; the echoed prompt's `token_logprobs` are the exact
log-probabilities of the prompt tokens and `top_logprobs` the k most likely alternatives, from
which the distribution summaries are estimated (`topk.estimate`). `generate_until` sends
`max_tokens` and `stop` with temperature 0. Works with our own server, vLLM, and any server
that accepts token-id prompts with `echo` (llama.cpp's server does not echo prompt
log-probabilities; it can only be measured by what it generates).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from trustmoe.eval.lm import LM, Capabilities, GenerateRequest, Generation
from trustmoe.eval.loglik import STAT_NAMES, Request, Scored, check_requests
from trustmoe.eval.topk import estimate, pseudo_logits
from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from trustmoe.data.tokenizer import TextCodec
    from trustmoe.eval.moe_diag import RoutingCollector


class OpenAILM(LM):
    kind = "openai"

    def __init__(self, client: httpx.Client, model: str, codec: TextCodec, *, max_length: int,
                 vocab_size: int, top_logprobs: int = 20, batch_size: int = 16) -> None:
        if not 1 <= top_logprobs <= 100:
            raise TrustmoeError(f"--top-logprobs must be in 1..100, got {top_logprobs}")
        if batch_size < 1:
            raise TrustmoeError(f"batch size must be >= 1, got {batch_size}")
        super().__init__(codec, max_length, vocab_size,
                         Capabilities(exact=False, logit_scale=False, top_k=top_logprobs))
        self.client, self.model = client, model
        self.top_logprobs, self.batch_size = top_logprobs, batch_size

    @classmethod
    def connect(cls, url: str, tokenizer_dir: Path, *, model: str | None = None,
                api_key: str | None = None, top_logprobs: int = 20, batch_size: int = 16,
                timeout: float = 600.0, max_length: int | None = None) -> OpenAILM:
        """Ask the server which model it serves (and its context), read the tokenizer dir."""
        from trustmoe.data.tokenizer import TextCodec

        if not url.startswith(("http://", "https://")):
            raise TrustmoeError(f"--model-url must start with http:// or https://, got {url!r}")
        tokenizer_dir = Path(tokenizer_dir)
        codec = TextCodec.from_dir(tokenizer_dir)
        cfg = _config(tokenizer_dir)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        try:
            cards = _get(client, "/models").get("data") or []
            ids = [c.get("id") for c in cards if isinstance(c, dict)]
            if model is None:
                if not ids:
                    raise TrustmoeError(f"{url}/models lists no model; pass --served-model")
                model = str(ids[0])
            card = next((c for c in cards if isinstance(c, dict) and c.get("id") == model), {})
            served_len = card.get("max_model_len")
            length = max_length or (served_len if isinstance(served_len, int) else None) or \
                cfg.get("max_position_embeddings")
            if not isinstance(length, int) or length < 2:
                raise TrustmoeError(f"{url} does not say its context length and "
                                    f"{tokenizer_dir}/config.json has no max_position_embeddings")
            vocab = cfg.get("vocab_size")
            return cls(client, model, codec, max_length=length,
                       vocab_size=vocab if isinstance(vocab, int) else codec.vocab_size,
                       top_logprobs=top_logprobs, batch_size=batch_size)
        except BaseException:
            client.close()
            raise

    def close(self) -> None:
        self.client.close()

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        return _request(self.client, "POST", "/completions", body)

    # ------------------------------------------------------------ scoring

    def score(self, requests: Sequence[Request], *, hidden: bool = False, logits: bool = False,
              routing: RoutingCollector | None = None,
              on_batch: Callable[[int], None] | None = None) -> list[Scored]:
        check_requests(requests, self.max_length)
        out: list[Scored] = []
        k = self.top_logprobs
        for b0 in range(0, len(requests), self.batch_size):
            batch = requests[b0:b0 + self.batch_size]
            res = self._post({"model": self.model, "prompt": [r.ids for r in batch],
                              "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": k})
            for r, ch in zip(batch, _choices(res, len(batch)), strict=True):
                tl, tops = _prompt_logprobs(ch, len(r.ids))
                lps = [float(tl[j] or 0.0) for j in range(r.start, len(r.ids))]
                listed = [list((tops[j] or {}).values()) for j in range(r.start, len(r.ids))]
                est = estimate(lps, listed, k, self.vocab_size)
                tg = np.asarray(r.ids[r.start:], dtype=np.int64)
                out.append(Scored(
                    targets=tg, logprobs=est["logprobs"], greedy=est["greedy"],
                    **{s: est[s] for s in STAT_NAMES},
                    logits=pseudo_logits(tg.tolist(), lps, listed, k, self.vocab_size)
                    if logits else None))
            if on_batch is not None:
                on_batch(len(batch))
        return out

    def generate_until(self, requests: Sequence[GenerateRequest]) -> list[Generation]:
        out: list[Generation | None] = [None] * len(requests)
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault((r.max_tokens, tuple(r.stop)), []).append(i)
        for (max_tokens, stop), idxs in groups.items():
            for b0 in range(0, len(idxs), self.batch_size):
                part = idxs[b0:b0 + self.batch_size]
                body: dict[str, Any] = {
                    "model": self.model, "max_tokens": max_tokens, "temperature": 0,
                    "prompt": [[self.prefix_id, *requests[i].context] for i in part]}
                if stop:
                    body["stop"] = list(stop)
                res = self._post(body)
                for i, ch in zip(part, _choices(res, len(part)), strict=True):
                    text = ch.get("text") or ""
                    ids = self.codec.encode(text, add_bos=False) if self.codec else []
                    out[i] = Generation(text, ids, str(ch.get("finish_reason") or "length"))
        return [g for g in out if g is not None]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "url": str(self.client.base_url), "model": self.model}


# ---------------------------------------------------------------- HTTP and parsing


def _config(tokenizer_dir: Path) -> dict[str, Any]:
    p = tokenizer_dir / "config.json"
    if not p.exists():
        return {}
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrustmoeError(f"{p} is not valid JSON: {e}") from None
    return obj if isinstance(obj, dict) else {}


def _get(client: httpx.Client, path: str) -> dict[str, Any]:
    return _request(client, "GET", path, None)


def _request(client: httpx.Client, method: str, path: str, body: dict[str, Any] | None
             ) -> dict[str, Any]:
    where = f"{client.base_url}{path}"
    try:
        r = client.request(method, path, json=body)
    except httpx.HTTPError as e:
        raise TrustmoeError(f"cannot reach {where}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        try:
            msg = r.json().get("error", {}).get("message") or r.text
        except (ValueError, AttributeError):
            msg = r.text
        raise TrustmoeError(f"{where} answered {r.status_code}: {str(msg)[:300]}")
    try:
        obj = r.json()
    except ValueError:
        raise TrustmoeError(f"{where} did not answer JSON") from None
    if not isinstance(obj, dict):
        raise TrustmoeError(f"{where} answered {type(obj).__name__}, not a JSON object")
    return obj


def _choices(res: dict[str, Any], n: int) -> list[dict[str, Any]]:
    ch = res.get("choices")
    if not isinstance(ch, list) or len(ch) != n or not all(isinstance(c, dict) for c in ch):
        raise TrustmoeError(f"the server answered {len(ch) if isinstance(ch, list) else 0} "
                            f"choices for {n} prompts")
    return sorted(ch, key=lambda c: int(c.get("index", 0)))


def _prompt_logprobs(choice: dict[str, Any], n_prompt: int
                     ) -> tuple[list[float | None], list[dict[str, float] | None]]:
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        raise TrustmoeError("the server returned no logprobs: it must support echo=True with "
                            "logprobs (OpenAI legacy completions) to be evaluated")
    tl, tops = lp.get("token_logprobs"), lp.get("top_logprobs")
    if not isinstance(tl, list) or len(tl) < n_prompt:
        raise TrustmoeError(f"the server echoed {len(tl) if isinstance(tl, list) else 0} prompt "
                            f"log-probabilities for a {n_prompt}-token prompt")
    if any(not isinstance(v, int | float) for v in tl[1:n_prompt]):
        raise TrustmoeError("the server returned a non-numeric prompt log-probability")
    if not isinstance(tops, list) or len(tops) < n_prompt:
        tops = [None] * n_prompt
    return tl, tops
