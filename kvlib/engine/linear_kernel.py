"""Linear layers on weights packed in panels of 16 output columns: small C kernels, float32 on AVX2
CPUs and bf16 on AVX-512 BF16 CPUs.

Design facts:
- A question over cached chunks runs ~25 rows through every product, and decode runs 1-16:
  there oneDNN's packed float32 product ran ~80 GFLOP/s in place (weights streaming from
  memory layer after layer) against ~130 on warm weights. linear_kernel.c streams each panel
  ([k x 16], contiguous) once per block of rows with 6-row register tiles over it. Measured on
  an AVX2 EPYC, SmolLM2's 120 layer products in turn (30 layers' weights, 425 MB, so they
  stream as in a request), interleaved: 1 row 25.2 -> 19.5 ms, 8 rows 31.1 -> 25.1, 25 rows
  67.2 -> 55.1, 512 rows level (791 / 792), 1,500 rows 2,202 -> 2,068.
- Batch-invariant, as oneDNN's float32 products are (fused.py): every output is the same chain
  of fused multiply-adds in k order, then the bias, whatever the other rows. Not oneDNN's bits
  (another order of sums), within float32 rounding of the product in float64 (tests).
- The panels replace the plain weight (as oneDNN's packed copy did): `Panels.to_dense` gives it
  back bit for bit (model.plain_weights, the doctor's reference forward).
- bf16 weights (kvlib computes in bf16 on CPUs with AVX-512 BF16 or AMX) take bf16_linear_kernel.c:
  panels of column pairs, VDPBF16PS dot products summed in float32, 4 rows x 64 columns a tile,
  each output rounded once to bf16 after the bias (as oneDNN's bf16 product), a residual added
  to that as torch's bf16 `h + y` adds it. Batch-invariant alike; within the rounding of oneDNN's
  bf16 product against float64 (tests).
- Built and loaded as kernels.py says, on torch's OpenMP threads. Only x86-64 CPUs with AVX2 and
  FMA take the float32 kernel, with AVX-512 BF16 the bf16 one; anywhere else, with no compiler,
  or with KVLIB_LINEAR_KERNEL=0 / KVLIB_BF16_LINEAR=0 (an A/B's other arm), fused.pack makes
  oneDNN's packed copy instead; `status()` says which and why.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from kvlib.engine.kernels import AVX512_BF16_CPU, AVX512_BF16_FLAGS, CKernel

FLAGS = ("-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-fopenmp")
KERNEL = CKernel(Path(__file__).with_name("linear_kernel.c"), FLAGS, "kvlib_linear_f32",
                 [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int], "KVLIB_LINEAR_KERNEL", {"avx2", "fma"})
BF16 = CKernel(Path(__file__).with_name("bf16_linear_kernel.c"), AVX512_BF16_FLAGS, "kvlib_linear_bf16",
               KERNEL.argtypes, "KVLIB_BF16_LINEAR", AVX512_BF16_CPU)
WIDTH = 16  # output columns per panel


def status() -> str:
    """'compiled' or why oneDNN's packed products are used (float32; bf16_status() for bf16)."""
    return KERNEL.status()


def bf16_status() -> str:
    return BF16.status()


@dataclass(frozen=True, eq=False)
class Panels:
    """A weight [n, k] as ceil(n / 16) panels (columns past n zero): float32 [k, 16], or bf16
    [k / 2, 16, 2] (each column's pairs of k together)."""

    data: torch.Tensor
    n: int

    @property
    def k(self) -> int:
        return self.data.shape[1] * (2 if self.data.dim() == 4 else 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    def to_dense(self) -> torch.Tensor:
        """The weight [n, k], bit for bit."""
        return self.data.transpose(1, 2).reshape(-1, self.k)[: self.n].contiguous()

    def apply(self, x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(x [..., k] @ weight^T + bias) + residual [..., n] -> [..., n]."""
        k, dtype = self.k, self.data.dtype
        rows = x.reshape(-1, k).to(dtype).contiguous()
        out = torch.empty(rows.shape[0], self.n, dtype=dtype)
        bias = None if bias is None else bias.to(dtype).contiguous()  # held until the call returns
        res = None if residual is None else residual.reshape(rows.shape[0], self.n).to(dtype).contiguous()
        if rows.shape[0]:
            fn = (BF16 if dtype == torch.bfloat16 else KERNEL).function()
            rc = fn(rows.data_ptr(), rows.shape[0], k, self.data.data_ptr(), self.n,
                    None if bias is None else bias.data_ptr(), None if res is None else res.data_ptr(),
                    out.data_ptr(), torch.get_num_threads())
            if rc != 0:
                raise RuntimeError(f"linear kernel refused its operands ({rc})")
        return out.reshape(*x.shape[:-1], self.n)


def takes(weight: torch.Tensor) -> bool:
    """A float32 CPU weight, or a bf16 one of even k, on a machine where its kernel builds."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return False
    if weight.dtype == torch.bfloat16:
        return weight.shape[1] % 2 == 0 and BF16.function() is not None
    return weight.dtype == torch.float32 and KERNEL.function() is not None


def panels(weight: torch.Tensor) -> Panels:
    """The weight [n, k] packed for its kernel (takes(weight) must hold)."""
    n, k = weight.shape
    padded = torch.zeros((n + WIDTH - 1) // WIDTH * WIDTH, k, dtype=weight.dtype)
    padded[:n] = weight.detach()
    rows = (k // 2, 2) if weight.dtype == torch.bfloat16 else (k,)  # bf16: each column's pairs of k together
    return Panels(padded.view(-1, WIDTH, *rows).transpose(1, 2).contiguous(), n)
