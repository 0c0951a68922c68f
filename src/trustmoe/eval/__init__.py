"""Evaluation beyond accuracy, of whatever is served: every metric talks to one `LM` interface.

    >>> from trustmoe.eval import loglik, open_lm, run_eval
    >>> scores = loglik("runs/demo/model", ["def f(x):\n    return x"])
    >>> lm = open_lm("engine", model_dir=Path("runs/demo/model"), quantize="int8")
    >>> lm.loglikelihood_rolling([[5, 6, 7]])[0].logprobs
    >>> run_eval(model_dir, data_dir, out_dir, quick=True)   # eval.json + report.html

Modules: `lm` (the interface: loglikelihood, loglikelihood_rolling, generate_until;
`Capabilities`; `open_lm`), `backend_model` (the torch model), `backend_engine` (the serving
engine, fp32/int8/int4), `backend_openai` (any OpenAI-compatible server; `topk` estimates the
distribution summaries from top-k log-probabilities), `loglik` (requests and the summary
maths), `packed` (shared-context multiple choice), `tasks`, `calibration`, `ood`,
`robustness`, `attack`, `membership`, `extraction`, `contamination`, `moe_diag`, `bootstrap`
(95% intervals), `stages` and `runner` (`run_eval`), `report`.
"""

from __future__ import annotations

from typing import Any

from trustmoe.eval.lm import LM, Capabilities, ContinuationRequest, GenerateRequest, open_lm
from trustmoe.eval.loglik import Request, Scored, loglik

__all__ = ["LM", "Capabilities", "ContinuationRequest", "GenerateRequest", "Request", "Scored",
           "loglik", "open_lm", "run_eval"]


def run_eval(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See `trustmoe.eval.runner.run_eval` (imported lazily: it pulls in sklearn/matplotlib)."""
    from trustmoe.eval.runner import run_eval as _run_eval

    return _run_eval(*args, **kwargs)
