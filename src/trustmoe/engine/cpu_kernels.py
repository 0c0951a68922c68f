"""CPU decode kernels, compiled from `csrc/*.c` on first use.

- `mm_f32`, `mm_int8`, `mm_int4` (matvec.c): `x @ W.T` for x of 1..`MAX_ROWS` rows, reading W
  once with both of torch's OpenMP threads, each output summed in the same order whatever the
  row count (so results are batch-invariant by construction).
- `tm_decode_step`, `tm_final` (decode.c): every layer's attention and MoE/MLP block (and
  optionally the final norm + LM head) for up to `MAX_ROWS` decode rows in one call, or the
  final norm + LM head alone (used by `trustmoe.engine.fast_decode` through `lib()` and the
  `TmWeight` / `TmLayer` descriptors).
- `gemm` (gemm.c): x @ W.T for any row count, each output one FMA chain over k in order.

See the C files for why.

The shared object is built with the system C compiler (`cc -O3 -march=native -fopenmp`) into
`$TRUSTMOE_CACHE/kernels` (default `~/.cache/trustmoe/kernels`), named by a hash of the
source, the flags, the compiler and this CPU, written to a temporary name and renamed, so
concurrent first uses are safe. Where no compiler is found or the build fails, `available()`
is False and callers fall back to torch's own matmuls (one warning says why).
`TRUSTMOE_CPU_KERNELS=0` turns the kernels off. `TRUSTMOE_KERNEL_MARCH` replaces `native` in
`-march=` (e.g. `x86-64`: no AVX2/FMA, the portable vector path CI forces to test it);
`vector_path()` says which path the loaded build holds.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

MAX_ROWS = 16  # decode rows per kernel call; more rows (prefill) go through gemm.c
CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "matvec.c", CSRC / "decode.c", CSRC / "gemm.c"]
HEADERS = [CSRC / "kernels.h"]
_c_int, _ptr = ctypes.c_int, ctypes.c_void_p

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
        keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(keep)
    except OSError:
        return platform.processor() or platform.machine()


def _torch_uses_gomp() -> bool:
    """True when torch's OpenMP runtime is a libgomp already loaded in this process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libgomp" in maps and "OpenMP" in torch.__config__.parallel_info()


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    # fp-contract off: the C code places every fused multiply-add itself, identically in
    # every tile shape, which batch invariance relies on
    march = os.environ.get("TRUSTMOE_KERNEL_MARCH", "native")
    if not march.replace("-", "").replace("_", "").isalnum():
        raise RuntimeError(f"TRUSTMOE_KERNEL_MARCH={march!r} is not a -march name")
    flags = ["-O3", f"-march={march}", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off"]
    if _torch_uses_gomp():  # share torch's thread pool rather than start a second one
        flags.append("-fopenmp")
    src = b"\0".join(p.read_bytes() for p in SOURCES + HEADERS)
    ver = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), ver.encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    root = Path(os.environ.get("TRUSTMOE_CACHE", Path.home() / ".cache" / "trustmoe")) / "kernels"
    so = root / f"trustmoe-{key}.so"
    if not so.exists():
        root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=root)
        os.close(fd)
        try:
            res = subprocess.run([cc, *flags, "-o", tmp, *map(str, SOURCES), "-lm"],
                                 capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[:400]}")
            os.replace(tmp, so)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(so))
    lib.tm_mm_f32.argtypes = [_ptr, _c_int, _ptr, _c_int, _c_int, _ptr, _c_int, _c_int]
    lib.tm_mm_i8.argtypes = [_ptr, _c_int, _ptr, _ptr, _c_int, _c_int, _ptr, _c_int, _c_int]
    lib.tm_mm_i4.argtypes = [_ptr, _ptr, _ptr, _ptr, _ptr, _c_int, _c_int, _c_int, _ptr, _c_int,
                             _c_int]
    i64, f32 = ctypes.c_int64, ctypes.c_float
    # x, M, d, eps, layers, L, cos, sin, nslots, new_slot, slots, offs, H, Hkv, hd, E, topk,
    # norm_topk, scratch, max_slots, routes, norm, head, logits, kv16
    lib.tm_decode_step.argtypes = [_ptr, _c_int, _c_int, f32, _ptr, _c_int, _ptr, _ptr, i64, _ptr,
                                   _ptr, _ptr, _c_int, _c_int, _c_int, _c_int, _c_int, _c_int, _ptr,
                                   i64, _ptr, _ptr, _ptr, _ptr, _c_int]
    # x, M, d, ln, eps, head, scratch, logits
    lib.tm_final.argtypes = [_ptr, _c_int, _c_int, _ptr, f32, _ptr, _ptr, _ptr]
    # w, x, ldx, M, y, ldy
    lib.tm_gemm.argtypes = [_ptr, _ptr, _c_int, _c_int, _ptr, _c_int]
    lib.tm_gemm.restype = _c_int
    lib.tm_gemm_tile.argtypes = [_ptr, _ptr]
    lib.tm_gemm_tile.restype = _c_int
    for f in (lib.tm_mm_f32, lib.tm_mm_i8, lib.tm_mm_i4, lib.tm_decode_step, lib.tm_final):
        f.restype = None
    lib.tm_num_threads.restype = _c_int
    lib.tm_vector_path.restype = _c_int
    return lib


def _get() -> ctypes.CDLL | None:
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("TRUSTMOE_CPU_KERNELS", "1") not in ("0", "false", "no", "off"):
                try:
                    _lib = _build()
                except (OSError, RuntimeError) as e:
                    warnings.warn(f"trustmoe CPU kernels unavailable, using torch matmuls: {e}",
                                  RuntimeWarning, stacklevel=3)
            _tried = True
    return _lib


class TmWeight(ctypes.Structure):
    """C `tm_weight`: one weight matrix as stored (see csrc/kernels.h)."""

    _fields_ = [("kind", _c_int), ("N", _c_int), ("K", _c_int), ("gs", _c_int), ("w", _ptr),
                ("scale", _ptr), ("zero", _ptr)]


class TmLayer(ctypes.Structure):
    """C `tm_layer` (csrc/decode.c): one layer's norms, weights and KV cache for a decode step."""

    _fields_ = [("ln1", _ptr), ("ln2", _ptr), ("wqkv", _ptr), ("wo", _ptr), ("router", _ptr),
                ("w13", _ptr), ("w2", _ptr), ("hdim", _c_int), ("sh13", _ptr), ("sh2", _ptr),
                ("sh_gate", _ptr), ("sh_hdim", _c_int), ("kc", _ptr), ("vc", _ptr)]


F32, INT8, INT4 = 0, 1, 2


def lib() -> ctypes.CDLL:
    """The loaded kernels (call only when `available()`)."""
    out = _get()
    assert out is not None, "CPU kernels unavailable"
    return out


def vector_path() -> str:
    """"avx2+fma", "avx2", "fma" or "generic": the vector code the loaded kernels hold."""
    bits = int(lib().tm_vector_path())
    return {3: "avx2+fma", 1: "avx2", 2: "fma"}.get(bits, "generic")


def available() -> bool:
    """True when the compiled kernels can be used in this process."""
    return _get() is not None


def usable(x: Tensor) -> bool:
    """Whether `x` (M, K) is a shape and kind of input the kernels take."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
            and 0 < x.shape[0] <= MAX_ROWS and x.stride(1) == 1 and available())


def mm_f32(x: Tensor, w: Tensor) -> Tensor:
    """x (M, K) fp32 with unit column stride, w (N, K) contiguous fp32 -> (M, N)."""
    lib = _get()
    assert lib is not None
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N)
    lib.tm_mm_f32(x.data_ptr(), x.stride(0), w.data_ptr(), K, N, y.data_ptr(), N, M)
    return y


def mm_int8(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x (M, K) fp32, q (N, K) int8 contiguous, scale (N,) fp32 -> (M, N) = x @ (q * scale).T."""
    lib = _get()
    assert lib is not None
    M, K = x.shape
    N = q.shape[0]
    y = torch.empty(M, N)
    lib.tm_mm_i8(x.data_ptr(), x.stride(0), q.data_ptr(), scale.data_ptr(), K, N, y.data_ptr(), N, M)
    return y


def mm_int4(x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """x (M, K) fp32; packed (N, K/2) uint8; scale, zero (N, K/gs) -> (M, N).

    W = (code - 8) * scale + zero per group of `group_size` inputs; group_size % 16 == 0.
    """
    lib = _get()
    assert lib is not None
    M, K = x.shape
    N = packed.shape[0]
    G = K // group_size
    # de-interleave each group: [x0 x2 x4 ... | x1 x3 x5 ...] matches the nibble order
    xd = x.reshape(M, G, group_size // 2, 2).transpose(-1, -2).contiguous()  # (M, G, 2, gs/2)
    xsum = x.reshape(M, G, group_size).sum(-1).contiguous()  # (M, G)
    y = torch.empty(M, N)
    lib.tm_mm_i4(xd.data_ptr(), xsum.data_ptr(), packed.data_ptr(), scale.data_ptr(),
                 zero.data_ptr(), K, N, group_size, y.data_ptr(), N, M)
    return y


def gemm(x: Tensor, w: TmWeight) -> Tensor:
    """x (M, K) fp32 with unit column stride, any M >= 1; w: a weight's C descriptor (N, K)
    -> (M, N) = x @ W.T through gemm.c's blocked GEMM, whose every output is one FMA chain
    over k in order (batch-invariant at any M). MemoryError when packing buffers fail."""
    lib = _get()
    assert lib is not None
    M, K = x.shape
    assert K == w.K and M >= 1 and x.stride(1) == 1
    y = torch.empty(M, w.N)
    if lib.tm_gemm(ctypes.byref(w), x.data_ptr(), x.stride(0), M, y.data_ptr(), w.N) != 0:
        raise MemoryError("trustmoe GEMM: no memory for its packing buffers")
    return y


def gemm_tile() -> tuple[int, int, int]:
    """(MR, NR, vector width) of the loaded GEMM micro-kernel (16-wide: AVX-512)."""
    mr, nr = ctypes.c_int(), ctypes.c_int()
    vw = int(lib().tm_gemm_tile(ctypes.byref(mr), ctypes.byref(nr)))
    return mr.value, nr.value, vw


def num_threads() -> int:
    """Threads the kernels run on (torch's OpenMP team), or 0 when they are unavailable."""
    lib = _get()
    return 0 if lib is None else int(lib.tm_num_threads())


__all__ = ["F32", "INT4", "INT8", "MAX_ROWS", "TmLayer", "TmWeight", "available", "gemm", "gemm_tile", "lib",
           "mm_f32", "mm_int4", "mm_int8", "num_threads", "usable"]
