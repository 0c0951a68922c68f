"""Top-k estimates: exact when every token is listed, and bounded the right way when not."""

from __future__ import annotations

import numpy as np
import torch

from trustmoe.eval import calibration as cal
from trustmoe.eval.loglik import stats
from trustmoe.eval.topk import estimate, pseudo_logits, split_listed


def _case(n: int = 64, V: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g, dtype=torch.float64) * 2.0
    targets = torch.randint(0, V, (n,), generator=g)
    return logits, targets


def _listing(logits: torch.Tensor, targets: torch.Tensor, k: int
             ) -> tuple[list[float], list[list[float]]]:
    """What a server sends: the target's log-probability, and the top-k plus the target."""
    lp = logits.log_softmax(-1)
    tl = lp.gather(1, targets[:, None]).squeeze(1).tolist()
    listed = []
    for row, t in zip(lp, targets.tolist(), strict=True):
        top = row.topk(k).indices.tolist()
        listed.append([float(row[i]) for i in dict.fromkeys([t, *top])])
    return tl, listed


def test_everything_listed_is_exact() -> None:
    logits, targets = _case()
    V = logits.shape[1]
    tl, listed = _listing(logits, targets, V)
    est = estimate(tl, listed, V, V)
    ref = {k: v.numpy() for k, v in stats(logits, targets).items()}
    for name in ("logprobs", "entropy", "logp_var", "max_prob", "sum_p2"):
        np.testing.assert_allclose(est[name], ref[name], atol=2e-6, err_msg=name)  # ref: fp32
    np.testing.assert_array_equal(est["greedy"], ref["greedy"])
    assert np.isnan(est["lse"]).all() and np.isnan(est["max_logit"]).all()
    z = pseudo_logits(targets.tolist(), tl, listed, V, V)
    a, b = cal.from_logits(z, targets), cal.from_logits(logits.float(), targets)
    for key in ("ece_15_equal_width", "brier", "nll", "accuracy"):
        assert abs(a[key] - b[key]) < 1e-5, key


def test_top_k_estimates_are_bounded() -> None:
    logits, targets = _case(seed=1)
    V = logits.shape[1]
    ref = {k: v.numpy() for k, v in stats(logits, targets).items()}
    for k in (1, 5, 20):
        tl, listed = _listing(logits, targets, k)
        est = estimate(tl, listed, k, V)
        np.testing.assert_allclose(est["logprobs"], ref["logprobs"], atol=2e-6)
        np.testing.assert_array_equal(est["greedy"], ref["greedy"])
        np.testing.assert_allclose(est["max_prob"], ref["max_prob"], atol=2e-6)
        # the unlisted mass spread evenly is the maximum-entropy, minimum-sum-of-squares tail
        assert (est["entropy"] >= ref["entropy"] - 2e-6).all()
        assert (est["sum_p2"] <= ref["sum_p2"] + 2e-6).all()
    err5 = np.abs(estimate(*_listing(logits, targets, 5), 5, V)["entropy"] - ref["entropy"])
    err20 = np.abs(estimate(*_listing(logits, targets, 20), 20, V)["entropy"] - ref["entropy"])
    assert err20.mean() < err5.mean()  # more alternatives, better estimates


def test_split_listed_finds_the_target_by_value() -> None:
    assert split_listed(-1.0, [-0.5, -1.0, -2.0], 2) == ([-0.5, -2.0], False)
    assert split_listed(-0.5, [-0.5, -1.0], 2) == ([-1.0], True)
    assert split_listed(-3.0, [-0.5, -1.0], 2) == ([-0.5, -1.0], False)  # target not listed
    assert split_listed(-0.1, [], 5) == ([], True)
