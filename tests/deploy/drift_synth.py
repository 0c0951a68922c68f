"""Synthetic request features with per-request structure (topics), for fast detector tests."""

from __future__ import annotations

import numpy as np

from trustmoe.engine.features import RequestFeatures
from trustmoe.eval.profile import Profile, build_profile

V, D, L, E = 300, 8, 2, 4


class Stream:
    """Requests from a mixture of topics; `shift` moves tokens, scalars, hidden and routing."""

    def __init__(self, seed: int, shift: float = 0.0, length_scale: float = 1.0,
                 routing_shift: float = 0.0) -> None:
        self.rng = np.random.default_rng(seed)
        base = np.random.default_rng(1234)  # the "world": fixed across streams
        self.topic_tokens = [base.permutation(V)[:60] for _ in range(4)]
        self.topic_mean = base.normal(size=(4, D))
        self.load = np.array([[0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
        self.shift, self.length_scale, self.routing_shift = shift, length_scale, routing_shift

    def one(self) -> RequestFeatures:
        r = self.rng
        t = int(r.integers(4))
        n = max(1, int(r.lognormal(3.0, 0.6) * self.length_scale))
        zipf = 1.0 / np.arange(1, 61) ** 1.1
        zipf /= zipf.sum()
        ids = self.topic_tokens[t][r.choice(60, size=n, p=zipf)]
        if self.shift > 0:  # some tokens from outside every topic
            k = r.random(n) < self.shift
            ids = np.where(k, r.integers(V - 40, V, size=n), ids)
        nll = r.normal(3 + 0.2 * t + self.shift, 0.5) if n > 1 else float("nan")
        hid = (self.topic_mean[t] + r.normal(size=D) * 0.8 + self.shift).astype(np.float32)
        load = self.load.copy()
        if self.routing_shift:
            load[:, 0] += self.routing_shift
            load /= load.sum(1, keepdims=True)
        routing = np.stack([r.multinomial(2 * n, r.dirichlet(50 * load[li])) for li in range(L)])
        return RequestFeatures(token_ids=ids.astype(np.int64), mean_nll=float(nll),
                               mean_entropy=float(r.normal(2.5, 0.3)) if n > 1 else float("nan"),
                               mean_top1=float(r.beta(4, 4)) if n > 1 else float("nan"),
                               hidden=hid, routing=routing.astype(np.int64), n_scored=min(n - 1, 16))

    def take(self, n: int) -> list[RequestFeatures]:
        return [self.one() for _ in range(n)]


def synthetic_profile(n: int = 600, seed: int = 0) -> Profile:
    return build_profile(Stream(seed).take(n), V, {"kind": "synthetic"})
