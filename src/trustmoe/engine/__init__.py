"""Batched, paged, quantizable inference: `Engine(model_dir).generate(prompts)`.

    config.py       EngineConfig: every engine setting and its default, declared once
    engine.py       the API: requests in, `RequestOutput`s out; step = schedule -> run -> update
    scheduler.py    continuous batching, one scheduling decision per forward pass
    kv_cache.py     paged KV cache with prefix caching (block tables, slot maths)
    weights.py      the runner's weight layout, read by Hugging Face tensor names (one table)
    artifact.py     model directories into that layout; quantized artifacts
    quantize.py     fp / int8 / int4 weights (`Weight.mm`)
    runner.py       the torch forward pass over a flat batch of chunks (calls
                    `trustmoe.model.functional`, the one definition of the maths)
    fast_decode.py  CPU decode rows through whole-block C kernels (`csrc/`, `cpu_kernels.py`),
                    an accelerated copy of the same maths, tested equal to the model
    invariance.py   batch-invariance probes; arena.py: decode weights in one huge-page block
    sampling.py     one sampler, one seed rule; output.py: detokenization, stops, outputs

Inference is dropless: `ModelConfig.capacity_factor` is a training-only option.
"""

from trustmoe.config import EngineConfig
from trustmoe.engine.engine import Engine, EngineStats, GenerationResult
from trustmoe.engine.output import RequestOutput
from trustmoe.engine.sampling import SamplingParams, TokenLogprob
from trustmoe.engine.scheduler import PromptTooLongError, QueueFullError

__all__ = [
    "Engine", "EngineConfig", "EngineStats", "GenerationResult", "PromptTooLongError",
    "QueueFullError", "RequestOutput", "SamplingParams", "TokenLogprob",
]
