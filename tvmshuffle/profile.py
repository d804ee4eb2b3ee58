"""Per-kernel timing of a built model (TVM 0.24+ has no Relax VM profiler).

Each compiled kernel (PrimFunc) is timed alone with ``time_evaluator`` on arguments of its
real shapes (random values; the kernels' run time does not depend on them), then reported
with its MACs, achieved GFLOP/s (2 FLOPs a MAC) and share of the summed time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kernels import Kernel


@dataclass
class KernelTime:
    kernel: Kernel
    median_ms: float  # one call
    share: float = 0.0  # of the summed time of all kernels (calls counted)

    @property
    def total_ms(self) -> float:
        return self.median_ms * self.kernel.calls

    @property
    def gflops(self) -> float:
        return 2 * self.kernel.macs / (self.median_ms * 1e6) if self.median_ms > 0 else 0.0

    def as_dict(self) -> dict:
        return {**self.kernel.as_dict(), "median_ms": self.median_ms, "total_ms": self.total_ms,
                "gflops": self.gflops, "share": self.share}


def kernel_library(executable_or_module):
    """The module holding the kernels' functions, from a VM executable or a loaded ``.so``."""
    mod = getattr(executable_or_module, "mod", executable_or_module)
    for candidate in [mod, *mod.imports]:
        if candidate.kind in ("library", "llvm", "c"):
            return candidate
    return mod.imports[0]


def time_kernels(library, kernels: list[Kernel], dev=None, number: int = 10, repeat: int = 5,
                 seed: int = 0) -> list[KernelTime]:
    """Time every kernel in ``library``; sorted slowest (by total time) first."""
    import tvm

    dev = dev or tvm.cpu()
    rng = np.random.default_rng(seed)
    rows = []
    for kernel in kernels:
        args = [tvm.runtime.tensor(rng.standard_normal(s).astype("float32"), dev)
                for s in kernel.inputs]
        args += [tvm.runtime.tensor(np.zeros(s, "float32"), dev) for s in kernel.outputs]
        timer = library.time_evaluator(kernel.name, dev, number=number, repeat=repeat)
        rows.append(KernelTime(kernel, float(np.median(timer(*args).results)) * 1e3))
    total = sum(r.total_ms for r in rows) or 1.0
    for r in rows:
        r.share = r.total_ms / total
    return sorted(rows, key=lambda r: r.total_ms, reverse=True)
