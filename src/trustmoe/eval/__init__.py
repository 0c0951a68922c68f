"""Evaluation beyond accuracy; every metric is built on one primitive, `loglik`.

    >>> from trustmoe.eval import loglik, run_eval
    >>> scores = loglik("runs/demo/model", ["def f(x):\n    return x"])
    >>> run_eval(model_dir, data_dir, out_dir, quick=True)   # eval.json + report.html
"""

from __future__ import annotations

from typing import Any

from trustmoe.eval.loglik import Request, Scored, loglik, score_requests

__all__ = ["Request", "Scored", "loglik", "run_eval", "score_requests"]


def run_eval(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See `trustmoe.eval.runner.run_eval` (imported lazily: it pulls in sklearn/matplotlib)."""
    from trustmoe.eval.runner import run_eval as _run_eval

    return _run_eval(*args, **kwargs)
