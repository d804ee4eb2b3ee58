"""Injective kernels (no reduction) writing an NCHW tensor: V2's concatenations, with the
shuffle gather of the identity half fused in front, V1's concatenation after the shortcut pool.

What it does
------------
TVM lowers them as plain serial loops (no hand schedule: one core, what LLVM auto-vectorizes).
They move memory only, yet ``profile --in-model`` put them at 19% of V2 1x on a Xeon (0.55 ms
in the model, 0.11 ms alone and warm: each writes a new buffer).

* **Stages inlined.** A gather in front (``shuffle_gather``) is computed where the
  concatenation reads it: one pass over the output, nothing written twice.
* **Channels over the cores**, the plane of each channel (contiguous in NCHW) as vectors:
  one vector expression over a chunk of the plane (the whole plane up to 64 floats, else the
  largest divisor <= 64), which LLVM splits into whole registers. A channel reads one source
  plane (the concatenation's and the shuffle's choices depend on the channel only), so the
  loads are contiguous too.

Measured alone (Xeon, Rocket Lake codegen, 2 threads, warm / cold): V2's ``gather +
concatenate`` 232 at 14x14 5.8 / 6.1 -> 3.1 / 4.1 us, ``concatenate`` 116 at 28x28 8.1 / 8.0 ->
4.5 / 5.0 us.
"""

from __future__ import annotations

NAME = "injective"
#: the most floats one vector expression covers (LLVM splits it into registers)
CHUNK = 64


def matches(layer, isa) -> bool:
    return layer.kind == "injective"


def _chunk(plane: int) -> int:
    return plane if plane <= CHUNK else max(d for d in range(1, CHUNK + 1) if plane % d == 0)


def apply(sch, layer, isa, sample: bool = False) -> None:
    *stages, last = [sch.get_sblock(name) for name in layer.blocks]
    for block in stages:
        sch.compute_inline(block)
    n, c, y, x = sch.get_loops(last)
    plane = sch.fuse(y, x)
    _, vector = sch.split(plane, [None, _chunk(layer.out_shape[2] * layer.out_shape[3])])
    sch.vectorize(vector)
    sch.parallel(sch.fuse(n, c))
