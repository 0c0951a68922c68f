"""The training fast path changes nothing but speed: fused lm_head + CE vs the plain path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trustmoe.config import get_preset
from trustmoe.model import fast
from trustmoe.model.fast import linear_cross_entropy, optimize_for_training
from trustmoe.model.transformer import Transformer

ATOL = 1e-5


@pytest.mark.parametrize(("N", "V", "chunk_rows"), [(37, 50, 8), (64, 33, 64), (5, 200, 16)])
def test_linear_cross_entropy_matches_torch(
    N: int, V: int, chunk_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast, "CHUNK_BYTES", chunk_rows * 4 * V)  # force several chunks
    g = torch.Generator().manual_seed(N)
    x = torch.randn(N, 24, generator=g, requires_grad=True)
    w = (torch.randn(V, 24, generator=g) * 0.5).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    t[::4] = -100  # ignored rows contribute neither loss nor gradient
    ref = F.cross_entropy(x @ w.T, t, ignore_index=-100)
    (0.37 * ref).backward()  # a non-unit upstream gradient (grad accumulation divides the loss)
    ref_gx, ref_gw = x.grad.clone(), w.grad.clone()  # type: ignore[union-attr]
    x.grad = w.grad = None
    loss, logits = linear_cross_entropy(x, w, t)
    (0.37 * loss).backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(logits, (x @ w.T).detach(), rtol=0, atol=ATOL)
    assert not logits.requires_grad
    torch.testing.assert_close(x.grad, ref_gx, rtol=0, atol=ATOL)
    torch.testing.assert_close(w.grad, ref_gw, rtol=0, atol=ATOL)


def test_linear_cross_entropy_edge_cases() -> None:
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    ignored = torch.full((6,), -100)
    loss, _ = linear_cross_entropy(x, w, ignored)
    assert math.isnan(float(loss.detach()))
    assert math.isnan(float(F.cross_entropy(x.detach() @ w.detach().T, ignored)))
    loss.backward()
    assert x.grad is not None and bool((x.grad == 0).all())
    t = torch.randint(0, 10, (6,))
    with torch.no_grad():  # evaluation: loss only, no gradient buffers
        loss, logits = linear_cross_entropy(x, w, t)
    torch.testing.assert_close(loss, F.cross_entropy(x @ w.T, t), rtol=0, atol=ATOL)
    assert logits.shape == (6, 10)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_model_step_equals_plain(tied: bool) -> None:
    cfg = get_preset("tiny").model.replace(tie_word_embeddings=tied)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    fused = Transformer(cfg)
    fused.load_state_dict(plain.state_dict())
    assert optimize_for_training(fused) is fused and fused.fused_loss and not plain.fused_loss
    idx = torch.randint(0, cfg.vocab_size, (3, 20))
    tgt = torch.randint(0, cfg.vocab_size, (3, 20))
    tgt[1, 5:9] = -100
    a = plain.run(idx, targets=tgt, return_stats=True)
    b = fused.run(idx, targets=tgt, return_stats=True)
    for name in ("loss", "ce_loss", "aux_loss", "z_loss", "logits"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=0, atol=ATOL, msg=name)
    assert a.loss is not None and b.loss is not None
    a.loss.backward()
    b.loss.backward()
    grads = dict(fused.named_parameters())
    for name, p in plain.named_parameters():
        assert p.grad is not None and grads[name].grad is not None, name
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=0, atol=ATOL, msg=name)
    # without targets the fused model is the plain model: logits keep their graph
    assert fused(idx).requires_grad


def test_cpu_allocator_tuning_stops_page_faults_on_big_buffers() -> None:
    """Run in a child process: the setting is process-wide."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import resource, sys, torch
        from trustmoe.model.fast import configure_cpu_allocator
        def faults():
            torch.empty(64 * 2**20 // 4).fill_(1.0)  # warm
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(10):
                torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MiB, freed at once
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        before = faults()
        ok = configure_cpu_allocator()
        print(before, faults(), ok)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, after, ok = out.stdout.split()
    if ok != "True":
        pytest.skip("glibc mallopt unavailable on this platform")
    assert int(before) > 10 * 10_000  # each fresh 64 MiB mmap faults in ~16k pages
    # reused heap memory faults no more (a VM's page reclaimer may still take some back)
    assert int(after) < int(before) / 2
