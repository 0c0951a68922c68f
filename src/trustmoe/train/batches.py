"""Deterministic batches from a token memmap.

Each optimizer step draws one global batch of `chunks * B` windows from (seed, step) alone.
Chunk c = micro * world + rank goes to micro-batch `micro` of process `rank`. So W processes
with A micro-batches see exactly the micro-batches that one process sees with W*A micro-batches:
resumed runs equal uninterrupted ones, and data-parallel runs equal a single process with the
same global batch (micro-batch for micro-batch, so even the batch-level MoE losses agree).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from trustmoe.io import TrustmoeError


class BatchSampler:
    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        if len(tokens) < seq_len + 2:
            raise TrustmoeError(
                f"only {len(tokens)} tokens in the split, fewer than one sequence of {seq_len + 1}; "
                "use more data or a shorter --seq-len"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.seed = seed

    def starts(self, step: int, global_batch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.seq_len - 1, size=global_batch)

    def batch(self, step: int, micro: int, batch_size: int, grad_accum: int = 1, rank: int = 0,
              world: int = 1) -> tuple[Tensor, Tensor]:
        """-> inputs (B, T), targets (B, T) int64 for this process's micro-batch."""
        chunk = micro * world + rank
        starts = self.starts(step, batch_size * grad_accum * world)
        starts = starts[chunk * batch_size:(chunk + 1) * batch_size]
        rows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64)
                         for s in starts])  # (B, T+1)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def eval_batches(self, n_batches: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        """Fixed, evenly spaced windows: the same validation set at every evaluation."""
        total = n_batches * batch_size
        hi = len(self.tokens) - self.seq_len - 1
        starts = np.linspace(0, hi, num=total, dtype=np.int64)
        out = []
        for b in range(n_batches):
            rows = np.stack([np.asarray(self.tokens[s:s + self.seq_len + 1], dtype=np.int64)
                             for s in starts[b * batch_size:(b + 1) * batch_size]])
            t = torch.from_numpy(rows)
            out.append((t[:, :-1], t[:, 1:]))
        return out
