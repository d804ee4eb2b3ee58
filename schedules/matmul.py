"""The classifier's ``matmul`` (``out[m, n] = sum_k x[m, k] * w[k, n]`` + bias): a GEMV, NCHW-free.

What it does
------------
ShuffleNet's last layer multiplies the pooled features (1 x 1024) by a constant weight laid out
``[K, N]`` (1024 x 1000, 4 MB): 1 MMAC per image, two flops per weight read, so it is bound by
how fast the weight streams from memory, not by the FMA units. As LegalizeOps writes it, the
loop over ``k`` is innermost: each output walks a *column* of the weight, 4 KB apart per step,
which touches a new cache line per multiply-add (TVM untuned: ~1 GFLOP/s, a fifth of V2's time).

* **Rows of the weight, not columns.** The ``n`` axis is split into tiles of ``cols`` vectors
  (``lanes`` wide: 8 floats AVX2, 4 NEON); under a tile, ``k`` runs outside and the tile's
  vectors inside, so each step reads ``cols * lanes`` contiguous floats of one weight row and
  does one broadcast FMA per vector. The weight is read once, in order, prefetcher-friendly.
* **Accumulators in registers.** The tile (``cols`` vectors, at most 8 and registers - 2) is
  unrolled, so LLVM keeps it in ymm/q registers for the whole ``k`` loop.
* Repacking the weight per tile (``[N / tile, K, tile]``, one contiguous stream per tile, at
  compile time) was tried and measured the same (343 vs 340 us for 1024 x 1000 on Rocket Lake,
  2 threads, ~12 GB/s), so the weight keeps its layout. TVM untuned: 1.3-2.3 ms.
* **Epilogue** (the bias add) on the tile right after it, vectorized.
* **Parallel** over the ``n`` tiles (and ``m``).
"""

from __future__ import annotations

from tvmshuffle.schedules import split_factors

NAME = "matmul"


def _tile(layer, isa):
    """(vector width, vectors per tile) or None when no vector width divides N."""
    for width in (isa.lanes, isa.lanes // 2):
        if width >= 2 and layer.n % width == 0:
            vectors = layer.n // width
            cols = max(d for d in range(1, min(8, isa.registers - 2) + 1) if vectors % d == 0)
            return width, cols
    return None


def matches(layer, isa) -> bool:
    return layer.kind == "matmul" and _tile(layer, isa) is not None


def apply(sch, layer, isa, sample: bool = False) -> None:
    width, cols = _tile(layer, isa)
    mm = sch.get_sblock(layer.block)
    epilogue = [sch.get_sblock(name) for name in layer.epilogue]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    last = epilogue[-1] if epilogue else None

    m, n, k = sch.get_loops(mm)
    n_vecs, n_lane = sch.split(n, [None, width])
    n_out, n_vec = sch.split(n_vecs, split_factors(sch, n_vecs, cols, sample))
    sch.reorder(m, n_out, k, n_vec, n_lane)
    outer = sch.fuse(m, n_out)
    if last is not None:
        sch.reverse_compute_at(last, outer, preserve_unit_loops=True)
        *_, e_n = sch.get_loops(last)
        e_vec, e_lane = sch.split(e_n, [None, width])
        sch.unroll(e_vec)
        sch.vectorize(e_lane)
    sch.unroll(n_vec)
    sch.vectorize(n_lane)
    sch.parallel(outer)
    sch.decompose_reduction(mm, k)
