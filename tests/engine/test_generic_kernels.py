"""The portable and AVX2 vector paths of the C kernels compute the same function.

CI machines have AVX-512, so the `#else` branches of `csrc/kernels.h` and `csrc/gemm.c` would
never run: this test rebuilds the kernels with `TRUSTMOE_KERNEL_MARCH=x86-64` (baseline
x86-64: SSE2 only, the portable path) and `x86-64-v3` (AVX2 + FMA, the 8-wide path) into a
fresh cache and re-runs the kernel and fast-decode parity tests against each build."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from trustmoe.engine import cpu_kernels

HERE = Path(__file__).parent


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_kernels_report_their_vector_path() -> None:
    if not cpu_kernels.available():
        pytest.fail("the C kernels did not build (a C compiler is part of the test machine)")
    forced = os.environ.get("TRUSTMOE_KERNEL_MARCH")
    if forced == "x86-64":
        assert cpu_kernels.vector_path() == "generic"
        assert cpu_kernels.gemm_tile()[2] == 8
    elif forced == "x86-64-v3":
        assert cpu_kernels.vector_path() == "avx2+fma"
        assert cpu_kernels.gemm_tile()[2] == 8
    elif forced is None and {"avx2", "fma"} <= _cpu_flags():
        assert cpu_kernels.vector_path() == "avx2+fma"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 -march names")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3"])
def test_other_vector_paths_pass_the_parity_tests(tmp_path: Path, march: str) -> None:
    if march == "x86-64-v3" and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU cannot run AVX2 code")
    env = dict(os.environ, TRUSTMOE_KERNEL_MARCH=march, TRUSTMOE_CACHE=str(tmp_path))
    tests = [f"{HERE / 'test_generic_kernels.py'}::test_kernels_report_their_vector_path",
             str(HERE / "test_cpu_kernels.py"), str(HERE / "test_fast_decode.py")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        "-W", "ignore::UserWarning", *tests], env=env, cwd=HERE.parent.parent,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1]
    built = list((tmp_path / "kernels").glob("trustmoe-*.so"))
    assert len(built) == 1  # this build, not the cached native one
