"""A layer's RMSNorm and gated SiLU in float32 or bf16, one C pass each instead of torch's chains of small ops.

Design facts:
- A question over cached chunks is ~25 rows: at that size each torch op costs its dispatch, not
  its arithmetic. torch's rms_norm on CPU is seven ops (pow, mean, add, rsqrt, mul, the weight's
  mul, a copy), ~100 us a call in the profile of a 4k rerope request, two per layer; silu and
  the product with up are two more, ~75 us. pointwise_kernel.c does each in one pass.
- The same formulas (x * 1/sqrt(mean(x^2) + eps), then the weight; g / (1 + e^-g), then times
  up), not torch's bits: its own order of the sum of squares and its own exponential (Cephes'),
  within float32 rounding (tests/test_pointwise_kernel.py against float64). Each row is worked
  on alone, in the same order whatever the other rows: batch-invariant, as the products are.
- A bf16 model (an AVX-512 BF16 CPU computes in bf16) takes the _bf16 twins: the same float32
  arithmetic on widened values, rounded to bf16 at the steps where torch's bf16 ops round
  (forward.norm's normalised row and its product with the weight; silu(gate), then its product
  with up), so within a bf16 rounding of torch's path (tests).
- Built and loaded as kernels.py says. Only x86-64 CPUs with AVX2 and FMA take it; anywhere
  else, for other dtypes or layouts, or with KVLIB_POINTWISE_KERNEL=0 (an A/B's other arm), the
  functions return None and the caller runs torch's ops; `status()` says which and why.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kvlib.engine.kernels import CKernel

FLAGS = ("-O3", "-mavx2", "-mfma", "-fPIC", "-shared", "-fopenmp")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
KERNEL = CKernel(Path(__file__).with_name("pointwise_kernel.c"), FLAGS, "kvlib_rms_norm_f32",
                 [_PTR, _I64, _I64, _PTR, ctypes.c_float, _PTR, ctypes.c_int], "KVLIB_POINTWISE_KERNEL",
                 {"avx2", "fma"})
_SILU_ARGS = [_PTR, _I64, _I64, _I64, _PTR, ctypes.c_int]
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


def status() -> str:
    """'compiled' or why torch's ops are used."""
    return KERNEL.status()


def _takes(*xs: torch.Tensor) -> bool:
    """All float32 or all bf16, on the CPU, where the kernel builds."""
    dtype = xs[0].dtype
    return (dtype in SUFFIX and all(x.dtype == dtype and x.device.type == "cpu" for x in xs)
            and KERNEL.function() is not None)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} kernel refused its operands ({rc})")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * (x / rms(x)) over the last dimension; None, having done nothing, where the kernel
    does not take the operands."""
    n = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != n or not _takes(x, weight):
        return None
    rows, weight = x.reshape(-1, n).contiguous(), weight.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype)
    if rows.shape[0]:
        fn = KERNEL.sibling(f"kvlib_rms_norm_{SUFFIX[x.dtype]}", KERNEL.argtypes)
        _check(fn(rows.data_ptr(), rows.shape[0], n, weight.data_ptr(), eps, out.data_ptr(), torch.get_num_threads()),
               "rms_norm")
    return out.view(x.shape)


def silu_mul(gate_up: torch.Tensor, intermediate: int) -> torch.Tensor | None:
    """silu(gate) * up for gate_up [..., 2 I] (gate then up); None, having done nothing, where the
    kernel does not take the operands."""
    if gate_up.shape[-1] != 2 * intermediate or not _takes(gate_up):
        return None
    rows = gate_up.reshape(-1, 2 * intermediate).contiguous()
    out = torch.empty(rows.shape[0], intermediate, dtype=gate_up.dtype)
    if rows.shape[0]:
        fn = KERNEL.sibling(f"kvlib_silu_mul_{SUFFIX[gate_up.dtype]}", _SILU_ARGS)
        _check(fn(rows.data_ptr(), rows.shape[0], intermediate, rows.stride(0), out.data_ptr(),
                  torch.get_num_threads()), "silu_mul")
    return out.view(*gate_up.shape[:-1], intermediate)
