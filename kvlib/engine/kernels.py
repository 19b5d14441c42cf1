"""Small C kernels for the CPU hot path, built on first use with the system's C compiler.

Design facts:
- Each kernel is plain C loaded through ctypes (no torch headers: it builds in about a second),
  compiled into kvlib's cache directory (KVLIB_KERNEL_DIR, else $XDG_CACHE_HOME/kvlib/kernels,
  else ~/.cache/kvlib/kernels), named by the hash of its source, its own headers and flags, written to a
  temporary name and renamed, so concurrent processes never load a half-written file. ctypes
  releases the GIL for each call.
- A kernel built with OpenMP links libgomp.so.1, the soname of the libgomp torch ships and
  has loaded already, so the dynamic loader hands it torch's: its parallel regions run on the
  same worker threads as torch's own ops, which are still spinning from the op before and take
  the work at once (a private pthread pool would fight them for the cores).
- Only x86-64 CPUs with the kernel's instruction sets take it. Anywhere else, with no compiler,
  when the build fails, or with the kernel's switch set to 0 (an A/B's other arm), `function()`
  is None and callers use torch; `status()` says which and why (kvlib doctor prints it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path


def kernel_dir() -> Path:
    explicit = os.environ.get("KVLIB_KERNEL_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvlib" / "kernels"


def cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


# How a kernel for AVX-512 BF16 (VDPBF16PS) builds, and the CPU flags it needs.
AVX512_BF16_FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fPIC", "-shared", "-fopenmp")
AVX512_BF16_CPU = frozenset({"avx512f", "avx512bw", "avx512_bf16"})


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


class CKernel:
    """One C source exporting one function: built or found on first use, then cached."""

    def __init__(self, source: Path, flags: tuple, symbol: str, argtypes: list, switch: str, cpu: set):
        self.source, self.flags, self.symbol, self.argtypes = source, flags, symbol, argtypes
        self.switch, self.cpu = switch, cpu
        self._lock = threading.Lock()
        self._state: dict = {}

    def headers(self) -> list[Path]:
        """The source's own headers (`#include "name.h"`, beside it): part of what names the build."""
        names = re.findall(r'^\s*#\s*include\s+"([^"]+)"', self.source.read_text(), flags=re.MULTILINE)
        return [self.source.with_name(name) for name in names]

    def unavailable_reason(self) -> str | None:
        if os.environ.get(self.switch, "").strip() == "0":
            return f"off ({self.switch}=0)"
        if platform.machine() not in ("x86_64", "AMD64"):
            return f"not an x86-64 CPU ({platform.machine()})"
        if missing := self.cpu - cpu_flags():
            return f"this CPU lacks {'/'.join(sorted(s.upper() for s in missing))}"
        if compiler() is None:
            return "no C compiler (cc) on PATH"
        return None

    def _build(self) -> ctypes.CDLL:
        source = self.source.read_bytes() + b"".join(h.read_bytes() for h in self.headers())
        digest = hashlib.sha256(source + " ".join(self.flags).encode()).hexdigest()[:16]
        target = (kernel_dir() / f"{self.source.stem}-{digest}.so").resolve()  # absolute: dlopen searches bare names
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                subprocess.run([compiler(), *self.flags, str(self.source), "-o", tmp], check=True,
                               capture_output=True, timeout=120)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return ctypes.CDLL(str(target))

    def function(self):
        """The loaded function, or None (with the reason kept for status())."""
        if "fn" in self._state:
            return self._state["fn"]
        with self._lock:
            if "fn" not in self._state:
                reason, fn, lib = self.unavailable_reason(), None, None
                if reason is None:
                    try:
                        lib = self._build()
                        fn = getattr(lib, self.symbol)
                        fn.argtypes, fn.restype = self.argtypes, ctypes.c_int
                    except Exception as exc:  # any failure leaves torch's ops, which are always right
                        detail = getattr(exc, "stderr", b"") or b""
                        if isinstance(detail, bytes):
                            detail = detail.decode(errors="replace")
                        reason = f"build failed: {exc}" + (f": {detail[:200]}" if detail else "")
                self._state.update(reason=reason, fn=fn, lib=lib)
        return self._state["fn"]

    def sibling(self, symbol: str, argtypes: list):
        """Another function of the same source (None wherever `function()` is None)."""
        if self.function() is None:
            return None
        fn = getattr(self._state["lib"], symbol)
        if fn.argtypes is None:  # ctypes hands back the same object for a name: typed once
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        return fn

    def status(self) -> str:
        """'compiled' or why torch's ops are used."""
        return "compiled" if self.function() is not None else self._state["reason"]


def statuses() -> dict:
    """Each C kernel's status() by name ("rope_kernel": "compiled", ...), for reports and the doctor."""
    from kvlib.engine import attn_kernel, layer_loop, linear_kernel, pointwise_kernel, rope_kernel

    modules = {"rope_kernel": rope_kernel, "attn_kernel": attn_kernel, "linear_kernel": linear_kernel,
               "pointwise_kernel": pointwise_kernel, "layer_loop": layer_loop}
    return {**{name: module.status() for name, module in modules.items()},
            "bf16_attn_kernel": attn_kernel.bf16_status(), "bf16_linear_kernel": linear_kernel.bf16_status(),
            "rope_kernel_avx512": rope_kernel.avx512_status()}
