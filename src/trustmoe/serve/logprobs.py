"""OpenAI logprob listings: legacy completions (`tokens`/`token_logprobs`/`top_logprobs`/
`text_offset`) and chat (`content: [{token, logprob, bytes, top_logprobs}]`).

Token texts are single-token decodes (half a UTF-8 character shows as U+FFFD, as in vLLM);
`-inf` becomes -9999.0 so the JSON stays valid.
"""

from __future__ import annotations

import math
from typing import Any

from trustmoe.serve.state import ServerState


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    return x if math.isfinite(x) else -9999.0


def completion_logprobs(state: ServerState, token_ids: list[int], lps: list[Any],
                        prompt_ids: list[int] | None, prompt_lps: list[float | None] | None,
                        start_offset: int = 0,
                        prompt_tops: list[dict[int, float] | None] | None = None) -> dict[str, Any]:
    """OpenAI legacy logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    Echoed prompt positions list the prompt token itself in `top_logprobs` plus the engine's
    top-k alternatives (`RequestOutput.prompt_top_logprobs`, there when prompt_logprobs = k > 0),
    so each holds up to k + 1 entries, as lm-evaluation-harness's greedy check expects.
    """
    dec = state.tokenizer.decode
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    if prompt_ids is not None:
        for i, t in enumerate(prompt_ids):
            tokens.append(dec([t], skip_special_tokens=False))
            lp = prompt_lps[i] if prompt_lps and i < len(prompt_lps) else None
            token_lps.append(_finite(lp))
            top = None if lp is None else {tokens[-1]: _finite(lp) or 0.0}
            alts = prompt_tops[i] if prompt_tops and i < len(prompt_tops) else None
            if top is not None and alts:
                for k, v in alts.items():
                    top.setdefault(dec([k], skip_special_tokens=False), _finite(v) or 0.0)
            tops.append(top)
    for t, lp in zip(token_ids, lps, strict=False):
        s = dec([t], skip_special_tokens=False)
        tokens.append(s)
        token_lps.append(_finite(lp.logprob))
        top = {dec([k], skip_special_tokens=False): _finite(v) or 0.0 for k, v in lp.top.items()}
        top.setdefault(s, _finite(lp.logprob) or 0.0)
        tops.append(top)
    offsets, pos = [], start_offset
    for s in tokens:
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(state: ServerState, lps: list[Any], token_ids: list[int]) -> dict[str, Any]:
    dec = state.tokenizer.decode

    def item(t: int, lp: float) -> dict[str, Any]:
        s = dec([t], skip_special_tokens=False)
        return {"token": s, "logprob": _finite(lp), "bytes": list(s.encode("utf-8"))}

    content = []
    for t, lp in zip(token_ids, lps, strict=False):
        d = item(t, lp.logprob)
        d["top_logprobs"] = [item(k, v) for k, v in sorted(lp.top.items(), key=lambda kv: -kv[1])]
        content.append(d)
    return {"content": content}
