"""The compiled CPU decode kernels agree with torch, are batch-invariant, and fall back cleanly."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from trustmoe.engine import cpu_kernels as ck
from trustmoe.engine.quantize import Int4Weight, Int8Weight, make_weight, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(not ck.available(), reason="no C compiler: kernels not built")


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("N, K", [(1, 8), (7, 40), (64, 256), (300, 517), (1030, 96)])
def test_f32_matches_torch_for_every_row_count(N: int, K: int) -> None:
    w = torch.randn(N, K, generator=_g(1))
    x = torch.randn(ck.MAX_ROWS, K, generator=_g(2))
    for m in (1, 2, 3, 5, ck.MAX_ROWS):
        torch.testing.assert_close(ck.mm_f32(x[:m], w), x[:m] @ w.t(), atol=1e-4, rtol=1e-4)


def test_every_row_has_the_same_bits_alone_or_in_any_batch() -> None:
    w = torch.randn(333, 515, generator=_g(3))
    x = torch.randn(ck.MAX_ROWS, 515, generator=_g(4))
    q8, s8 = quantize_int8(w[:, :512])
    p4, sc, z = quantize_int4(w[:, :512], 64)
    fns = [lambda a: ck.mm_f32(a, w), lambda a: ck.mm_int8(a[:, :512].contiguous(), q8, s8),
           lambda a: ck.mm_int4(a[:, :512].contiguous(), p4, sc, z, 64)]
    for fn in fns:
        full = fn(x)
        alone = torch.cat([fn(x[i: i + 1]) for i in range(ck.MAX_ROWS)])
        assert torch.equal(full, alone)
        assert torch.equal(fn(x[3:10]), full[3:10])


def test_strided_rows_are_read_correctly() -> None:
    w = torch.randn(50, 64, generator=_g(5))
    big = torch.randn(8, 128, generator=_g(6))
    x = big[::2, 32:96]  # row stride 256, unit column stride
    torch.testing.assert_close(ck.mm_f32(x, w), x @ w.t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("K", [64, 520])
def test_int8_is_weight_only(K: int) -> None:
    w = torch.randn(96, K, generator=_g(7))
    q, s = quantize_int8(w)
    x = torch.randn(4, K, generator=_g(8))
    ref = x @ (q.float() * s[:, None]).t()
    torch.testing.assert_close(ck.mm_int8(x, q, s), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gs", [16, 32, 128])
def test_int4_matches_dequantized_matmul(gs: int) -> None:
    w = torch.randn(72, 256, generator=_g(9))
    p, sc, z = quantize_int4(w, gs)
    x = torch.randn(6, 256, generator=_g(10))
    ref = x @ Int4Weight(p, sc, z, gs).dequantize().t()
    torch.testing.assert_close(ck.mm_int4(x, p, sc, z, gs), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_weights_switch_between_kernel_and_torch_by_row_count(mode: str | None) -> None:
    w = torch.randn(64, 128, generator=_g(11))
    wt = make_weight(w, mode, group_size=32)
    if mode == "int8":
        assert isinstance(wt, Int8Weight)
    small = torch.randn(3, 128, generator=_g(12))
    large = torch.randn(ck.MAX_ROWS + 5, 128, generator=_g(13))
    deq = wt.dequantize()
    for x in (small, large):
        torch.testing.assert_close(wt.mm(x), x @ deq.t(), atol=1e-4, rtol=1e-4)


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_switch_off_and_failed_build_fall_back_to_torch(tmp_path: object) -> None:
    code = ("import warnings, torch; warnings.simplefilter('always')\n"
            "from trustmoe.engine import cpu_kernels as ck\n"
            "from trustmoe.engine.quantize import make_weight\n"
            "w = torch.randn(8, 16); x = torch.randn(2, 16)\n"
            "torch.testing.assert_close(make_weight(w, 'int8').mm(x), x @ make_weight(w, 'int8')"
            ".dequantize().t(), atol=0.3, rtol=0)\n"
            "torch.testing.assert_close(make_weight(w, None).mm(x), x @ w.t())\n"
            "print('available', ck.available())\n")
    off = _run(code, TRUSTMOE_CPU_KERNELS="0")
    assert off.returncode == 0, off.stderr
    assert "available False" in off.stdout and "unavailable" not in off.stderr
    broken = _run(code, CC="/bin/false", TRUSTMOE_CACHE=str(tmp_path))
    assert broken.returncode == 0, broken.stderr
    assert "available False" in broken.stdout
    assert "CPU kernels unavailable" in broken.stderr  # one warning says why


@pytest.mark.parametrize("M, N, K", [(1, 1, 8), (7, 33, 40), (17, 100, 600), (200, 70, 257)])
def test_gemm_matches_torch_at_any_shape(M: int, N: int, K: int) -> None:
    # K = 600 spans three K blocks, M = 200 three row blocks, N = 33 / 70 partial panels
    w = torch.randn(N, K, generator=_g(14))
    x = torch.randn(M, K, generator=_g(15))
    desc = make_weight(w, None).c_desc()
    assert desc is not None
    ref = (x.double() @ w.double().t()).float()
    torch.testing.assert_close(ck.gemm(x, desc), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_gemm_rows_have_the_same_bits_alone_in_any_batch_or_order(mode: str | None) -> None:
    w = make_weight(torch.randn(130, 576, generator=_g(16)), mode, group_size=64)
    x = torch.randn(40, 576, generator=_g(17))
    full = w.gemm(x)
    assert full is not None
    torch.testing.assert_close(full, x @ w.dequantize().t(), atol=2e-4, rtol=2e-4)
    alone = torch.cat([w.gemm(x[i: i + 1]) for i in range(40)])  # type: ignore[misc]
    assert torch.equal(full, alone)
    perm = torch.randperm(40, generator=_g(18))
    assert torch.equal(w.gemm(x[perm]), full[perm])
    assert torch.equal(w.gemm(x[5:29]), full[5:29])


def test_prompt_sized_inputs_go_through_the_gemm() -> None:
    w = make_weight(torch.randn(64, 128, generator=_g(19)), "int8")
    x = torch.randn(ck.MAX_ROWS + 9, 128, generator=_g(20))
    assert torch.equal(w.mm(x), w.gemm(x))  # type: ignore[arg-type]
    mr, nr, vw = ck.gemm_tile()
    assert mr >= 1 and nr % vw == 0 and vw in (8, 16)
