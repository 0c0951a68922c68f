"""Weights as the inference engine reads them: fp, int8 per-channel, int4 group-wise.

Every weight is an object with `mm(x)` = `x @ W.T` (x: (M, K) -> (M, N)) and `nbytes`.

On CPU, inputs of up to `cpu_kernels.MAX_ROWS` rows (decoding) go through the compiled
few-row kernels of `trustmoe.engine.cpu_kernels`: they read W once with both threads, and sum
each output in the same order for any row count, so results are batch-invariant. Larger
inputs (prefill) go through the compiled blocked GEMM (`Weight.gemm`, csrc/gemm.c), whose
every output is one FMA chain over k in order, the same bits at any row count. Where the
kernels cannot be built, torch is used throughout.

- `FloatWeight` keeps W as (N, K) contiguous.
- `Int8Weight`: symmetric per-output-channel int8, scale = absmax / 127; weight-only
  numerics (y = (x @ Q.T) * scale). Without the compiled kernels, CPU calls go through
  fbgemm's int8 GEMM (`quantized::linear_dynamic`, which also quantizes the activations per
  call) unless `exact=True`; on CUDA the weight is dequantized per call.
- `Int4Weight`: asymmetric group-wise int4 (gpt-fast layout: w ~ (q - 8) * scale + zero per
  group of `group_size` input channels; low nibble = even input). Large inputs dequantize
  once per call.

A weight is stored under its matrix's name (see `trustmoe.engine.weights`) as `parts()`:
`NAME` (float), `NAME.q` + `NAME.scale` (int8) or `NAME.q4` + `NAME.scale` + `NAME.zero`
(int4); `read_weight` reads any of them back. Quantization is per output row, so row-wise
concatenation (`cat_rows`: fused QKV, fused gate+up) commutes with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from trustmoe.engine import cpu_kernels


class Weight:
    """x @ W.T for some stored form of W (N, K)."""

    out_features: int
    in_features: int

    def mm(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def dequantize(self) -> Tensor:
        """The (N, K) fp32 matrix this weight stands for."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def to(self, device: torch.device) -> Weight:
        raise NotImplementedError

    def rows(self, a: int, b: int) -> Weight:
        """Rows a..b-1 of W, in the same stored form (views)."""
        raise NotImplementedError

    def parts(self) -> dict[str, Tensor]:
        """The stored tensors by name suffix ("" for a float matrix)."""
        raise NotImplementedError

    def c_desc(self) -> cpu_kernels.TmWeight | None:
        """This weight as the C kernels' descriptor, or None where they cannot read it."""
        return None

    def gemm(self, x: Tensor) -> Tensor | None:
        """x (M, K) @ W.T through the compiled blocked GEMM (`cpu_kernels.gemm`), whose every
        row is the same bits at any M; None where it cannot run (not CPU fp32, no kernels)."""
        if not (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2
                and x.shape[0] > 0 and cpu_kernels.available()):
            return None
        key = tuple(t.data_ptr() for t in self.parts().values())  # the arena moves tensors
        cached = self.__dict__.get("_gemm_desc")
        if cached is None or cached[0] != key:
            cached = (key, self.c_desc())
            self.__dict__["_gemm_desc"] = cached
        if cached[1] is None:
            return None
        return cpu_kernels.gemm(x if x.stride(1) == 1 else x.contiguous(), cached[1])


class FloatWeight(Weight):
    def __init__(self, w: Tensor) -> None:
        # w: (N, K)
        self.out_features, self.in_features = w.shape
        self.w = w.detach().contiguous()  # (N, K)

    def mm(self, x: Tensor) -> Tensor:
        if self.w.dtype == torch.float32 and cpu_kernels.usable(x):
            return cpu_kernels.mm_f32(x, self.w)
        y = self.gemm(x)  # prompt-sized inputs
        return F.linear(x, self.w) if y is None else y  # (M, K) @ (K, N)

    def dequantize(self) -> Tensor:
        return self.w.float()

    @property
    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()

    def to(self, device: torch.device) -> FloatWeight:
        self.w = self.w.to(device)
        return self

    def rows(self, a: int, b: int) -> FloatWeight:
        return FloatWeight(self.w[a:b])

    def parts(self) -> dict[str, Tensor]:
        return {"": self.w}

    def c_desc(self) -> cpu_kernels.TmWeight | None:
        if self.w.device.type != "cpu" or self.w.dtype != torch.float32:
            return None
        return cpu_kernels.TmWeight(cpu_kernels.F32, self.out_features, self.in_features, 0,
                                    self.w.data_ptr(), None, None)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) -> q int8 (N, K), scale fp32 (N,): symmetric per output channel."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # (N,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Weight(Weight):
    def __init__(self, q: Tensor, scale: Tensor, exact: bool = False) -> None:
        self.q, self.scale = q.contiguous(), scale.float().contiguous()  # (N, K) int8, (N,)
        self.out_features, self.in_features = q.shape
        self.exact = exact
        self._packed: object | None = None
        if q.device.type == "cpu" and not exact and not cpu_kernels.available():
            self._packed = _fbgemm_pack(q, self.scale)

    def mm(self, x: Tensor) -> Tensor:
        if cpu_kernels.usable(x) and self.q.device.type == "cpu":
            return cpu_kernels.mm_int8(x, self.q, self.scale)
        y = self.gemm(x)
        if y is not None:
            return y
        if self._packed is not None and x.dtype == torch.float32:
            return torch.ops.quantized.linear_dynamic(x, self._packed, True)
        w = self.q.to(x.dtype)  # (N, K)
        return (x @ w.t()) * self.scale.to(x.dtype)

    def dequantize(self) -> Tensor:
        return self.q.float() * self.scale[:, None]

    @property
    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4

    def to(self, device: torch.device) -> Int8Weight:
        return Int8Weight(self.q.to(device), self.scale.to(device), self.exact)

    def rows(self, a: int, b: int) -> Int8Weight:
        return Int8Weight(self.q[a:b], self.scale[a:b], self.exact)

    def parts(self) -> dict[str, Tensor]:
        return {".q": self.q, ".scale": self.scale}

    def c_desc(self) -> cpu_kernels.TmWeight | None:
        if self.q.device.type != "cpu":
            return None
        return cpu_kernels.TmWeight(cpu_kernels.INT8, self.out_features, self.in_features, 0,
                                    self.q.data_ptr(), self.scale.data_ptr(), None)


def _fbgemm_pack(q: Tensor, scale: Tensor) -> object | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(
                q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qw, None)
    except (RuntimeError, AttributeError):  # no fbgemm/onednn in this build
        return None


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """w (N, K) -> packed uint8 (N, K/2) [low nibble = even k], scale, zero (N, K/gs)."""
    N, K = w.shape
    if group_size <= 0 or K % group_size:
        raise ValueError(f"int4 group size {group_size} must divide the input width {K}")
    g = w.detach().float().view(N, K // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)  # (N, G)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.view(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2)
    zero = lo + 8.0 * scale  # so that w ~ (q - 8) * scale + zero
    return packed.contiguous(), scale, zero


def unpack_int4(packed: Tensor) -> Tensor:
    """(N, K/2) uint8 -> (N, K) int32 in 0..15."""
    lo = (packed & 0xF).to(torch.int32)
    hi = (packed >> 4).to(torch.int32)
    return torch.stack([lo, hi], dim=-1).flatten(1)


class Int4Weight(Weight):
    def __init__(self, packed: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> None:
        self.packed = packed.contiguous()  # (N, K/2) uint8
        self.scale, self.zero = scale.float().contiguous(), zero.float().contiguous()  # (N, K/gs)
        self.group_size = group_size
        self.out_features = packed.shape[0]
        self.in_features = packed.shape[1] * 2

    def mm(self, x: Tensor) -> Tensor:
        if self.group_size % 16 == 0 and self.packed.device.type == "cpu" and cpu_kernels.usable(x):
            return cpu_kernels.mm_int4(x, self.packed, self.scale, self.zero, self.group_size)
        y = self.gemm(x)
        if y is not None:
            return y
        return F.linear(x, self.dequantize().to(x.dtype))

    def dequantize(self) -> Tensor:
        N, K = self.out_features, self.in_features
        q = unpack_int4(self.packed).float().view(N, K // self.group_size, self.group_size)
        w = (q - 8.0) * self.scale[..., None] + self.zero[..., None]
        return w.view(N, K)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + (self.scale.numel() + self.zero.numel()) * 4

    def to(self, device: torch.device) -> Int4Weight:
        return Int4Weight(self.packed.to(device), self.scale.to(device), self.zero.to(device),
                          self.group_size)

    def rows(self, a: int, b: int) -> Int4Weight:
        return Int4Weight(self.packed[a:b], self.scale[a:b], self.zero[a:b], self.group_size)

    def parts(self) -> dict[str, Tensor]:
        return {".q4": self.packed, ".scale": self.scale, ".zero": self.zero}

    def c_desc(self) -> cpu_kernels.TmWeight | None:
        if self.packed.device.type != "cpu" or self.group_size % 16:
            return None
        return cpu_kernels.TmWeight(cpu_kernels.INT4, self.out_features, self.in_features,
                                    self.group_size, self.packed.data_ptr(), self.scale.data_ptr(),
                                    self.zero.data_ptr())


def make_weight(w: Tensor, mode: str | None, group_size: int = 64,
                exact_int8: bool = False) -> Weight:
    """Wrap an (N, K) matrix as a Weight, quantizing it when `mode` says so."""
    if mode is None:
        return FloatWeight(w)
    if mode == "int8":
        q, s = quantize_int8(w)
        return Int8Weight(q, s, exact=exact_int8)
    if mode == "int4":
        if w.shape[1] % group_size:
            return FloatWeight(w)  # widths the group size does not divide stay in float
        return Int4Weight(*quantize_int4(w, group_size), group_size=group_size)
    raise ValueError(f"unknown quantization {mode!r}; choose int8 or int4")


def cat_rows(ws: list[Weight]) -> Weight:
    """One weight whose rows are those of `ws` in order (all of one stored form)."""
    if len(ws) == 1:
        return ws[0]
    if all(isinstance(w, FloatWeight) for w in ws):
        return FloatWeight(torch.cat([w.w for w in ws if isinstance(w, FloatWeight)]))
    if all(isinstance(w, Int8Weight) for w in ws):
        i8 = [w for w in ws if isinstance(w, Int8Weight)]
        return Int8Weight(torch.cat([w.q for w in i8]), torch.cat([w.scale for w in i8]), i8[0].exact)
    i4 = [w for w in ws if isinstance(w, Int4Weight)]
    if len(i4) == len(ws) and len({w.group_size for w in i4}) == 1:
        return Int4Weight(torch.cat([w.packed for w in i4]), torch.cat([w.scale for w in i4]),
                          torch.cat([w.zero for w in i4]), i4[0].group_size)
    kinds = sorted({type(w).__name__ for w in ws})
    raise ValueError(f"cannot fuse matrices stored in different forms ({', '.join(kinds)})")


def read_weight(state: Mapping[str, Tensor], name: str, exact_int8: bool = False) -> Weight | None:
    """The weight stored as `name` in any form of `Weight.parts()`, or None when absent."""
    if name in state:
        return FloatWeight(state[name])
    if f"{name}.q" in state:
        return Int8Weight(state[f"{name}.q"], state[f"{name}.scale"], exact_int8)
    if f"{name}.q4" in state:
        packed, scale = state[f"{name}.q4"], state[f"{name}.scale"]
        groups = scale.shape[1] if scale.dim() == 2 and scale.shape[1] else 1
        return Int4Weight(packed, scale, state[f"{name}.zero"], packed.shape[1] * 2 // groups)
    return None
