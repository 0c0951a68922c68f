"""Text in, text out through the engine (`trustmoe generate`, the demo's sample,
`trustmoe.generate`).

There is one decode path: the engine (`trustmoe.engine.Engine`) with its sampler and seed rule
(`trustmoe.engine.sampling`: a request with a seed owns a private generator seeded with it),
and one text encoding (`TextCodec`, the model's BOS in front). So the same prompt, sampling
settings and seed give the same text from the CLI, from Python and from `trustmoe serve`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from trustmoe.io import TrustmoeError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from trustmoe.engine import Engine
    from trustmoe.model.transformer import Transformer


def open_engine(model: str | Path | Transformer | Engine, *, quantize: str | None = None,
                device: str | None = None, tokenizer: Tokenizer | str | Path | None = None
                ) -> Engine:
    """An engine on a model dir, a loaded `Transformer` (give `tokenizer`), or as is."""
    from trustmoe.engine import Engine

    if isinstance(model, Engine):
        return model
    tok: Any = tokenizer
    if isinstance(tokenizer, str | Path):
        from trustmoe.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer)
    opts: dict[str, Any] = {"quantize": quantize}
    if device not in (None, "auto"):  # else the engine's own choice (CUDA when present)
        opts["device"] = device
    try:
        return Engine(model, tokenizer=tok, **opts)
    except ValueError as e:
        raise TrustmoeError(str(e)) from None


def generate_with(engine: Engine, prompt: str, *, max_tokens: int = 64,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                  seed: int | None = None, stop: list[str] | None = None) -> dict[str, Any]:
    """One prompt through `engine`: {"prompt_tokens", "prompt_token_ids", "token_ids", "text",
    "finish_reason"}."""
    from trustmoe.engine import SamplingParams

    if engine.tokenizer is None:
        raise TrustmoeError("the model has no tokenizer.json: cannot encode a text prompt")
    ids = engine.encode(prompt)
    limit = engine.max_model_len
    if len(ids) >= limit:
        raise TrustmoeError(f"prompt has {len(ids)} tokens; the model's context is {limit}")
    params = SamplingParams(max_tokens=min(max_tokens, limit - len(ids)), temperature=temperature,
                            top_p=top_p, top_k=top_k, seed=seed, stop=stop)
    try:
        res = engine.generate([ids], params=params)[0]
    except ValueError as e:
        raise TrustmoeError(str(e)) from None
    return {"prompt_tokens": len(ids), "prompt_token_ids": ids, "token_ids": list(res.token_ids),
            "text": res.text, "finish_reason": res.finish_reason}


def generate_text(
    model_dir: str | Path,
    prompt: str,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    device: str = "auto",
    *,
    top_k: int = 0,
    quantize: str | None = None,
    stop: list[str] | None = None,
) -> dict[str, Any]:
    """Load `model_dir` into an engine and continue `prompt` (greedy when temperature is 0)."""
    engine = open_engine(Path(model_dir), quantize=quantize, device=device)
    return generate_with(engine, prompt, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, top_k=top_k, seed=seed, stop=stop)
