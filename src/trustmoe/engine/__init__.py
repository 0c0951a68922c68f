"""Batched, paged, quantizable inference: `Engine(model_dir).generate(prompts)`.

See `engine.py` for the API, `scheduler.py` (continuous batching), `kv_cache.py` (paged KV
with prefix caching), `runner.py` (the forward pass), `sampling.py` and `output.py`.
"""

from trustmoe.engine.engine import Engine, EngineStats, GenerationResult, RequestOutput
from trustmoe.engine.sampling import SamplingParams, TokenLogprob
from trustmoe.engine.scheduler import PromptTooLongError, QueueFullError

__all__ = [
    "Engine", "EngineStats", "GenerationResult", "PromptTooLongError", "QueueFullError",
    "RequestOutput", "SamplingParams", "TokenLogprob",
]
