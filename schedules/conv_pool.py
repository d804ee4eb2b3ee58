"""The stem conv and the max pool that reads it, in one kernel (``FuseConvPool``).

Both ShuffleNets open with ``conv3x3/2 → BN → ReLU → maxpool3x3/2``. Apart, the conv writes
its 24 x 112 x 112 plane (1.2 MB) to memory and the pool reads it back; the graph pass puts the
two in one PrimFunc, and this file schedules it with ``stem.py`` beside it
(:func:`tvmshuffle.schedules.sibling`):

* **Blocks of pool rows over the cores.** The pool's output rows are cut into blocks of
  :data:`POOL_ROWS`; each block first computes the conv rows its windows read (``compute_at``:
  TVM sizes the buffer to the block, 24 channels x 2 x POOL_ROWS + 1 rows x 112 floats, about
  85 KB: L2), with ``stem.py``'s tiles, epilogue and padded input rows, then its windows.
  The conv's plane never goes to memory. Neighbouring blocks share one conv row, which both
  compute: 1 row in 2 x POOL_ROWS more conv work.
* **The windows**, as in ``pool.py``: each block copies its conv rows into the pool's padded
  rows (the ``-inf`` border), so the windows test no bounds; the taps unrolled; on x86 the
  output row is left to LLVM's loop vectorizer, on NEON TVM vectorizes it over rows laid out
  in two phases.

Measured (Intel Xeon, LLVM ``rocketlake``, 2 threads). Alone and warm the one kernel is slower
than the two: 141-153 us against 79-81 (``stem.py``) + 38-41 (``pool.py``) — one conv row in
eight computed twice, and the pool's padded rows copied per block. In the model it wins where
the memory traffic was: ``profile --in-model`` on V1 g3 1x put the stem at 0.287 ms and its max
pool near 0.07 ms apart, 0.245 ms as one kernel; the whole model, 4 interleaved rounds of
``run --repeat 40 --number 10``, went from 2.61-2.67 to 2.51-2.59 ms (V1 g3 1x) and stayed at
2.72-2.83 ms (V2 1x, whose stem and pool had tuned records). Blocks of 7 pool rows (8 blocks)
measured the same as blocks of 4. Of two forms that would drop the copy, the pool's padding
folded into the loads ran slower (a bounds test per tap: 340 against 270 us, one thread), and
the ReLU written straight into the padded rows does not schedule (``decompose_padding`` leaves
the rows two writers, which ``reverse_compute_at`` refuses).
"""

from __future__ import annotations

from tvmshuffle.schedules import phase_columns, sibling, vectorize_padding

NAME = "conv_pool"
#: pool output rows per block: 56 rows make 14 blocks, 7 per core on 2 cores
POOL_ROWS = 4

stem = sibling(__file__, "stem")


def matches(layer, isa) -> bool:
    return layer.kind == "conv_pool" and stem.matches(layer.conv, isa)


def _rows(layer) -> int:
    """Pool rows per block: the most, up to :data:`POOL_ROWS`, that divide the pool's height."""
    height = layer.pool.out_hw[0]
    return next((r for r in range(POOL_ROWS, 0, -1) if height % r == 0), 1)


def apply(sch, layer, isa, sample: bool = False) -> None:
    pool = sch.get_sblock(layer.pool.block)
    pad = sch.get_sblock(layer.pool.pad_block) if layer.pool.pad_block is not None else None
    # as pool.py: NEON vectorizes the output row over a plane in two phases, x86 leaves the
    # scalar row to LLVM's loop vectorizer
    vector_rows = isa.deinterleaving_loads
    phased = vector_rows and pad is not None and phase_columns(sch, pad, layer.pool.stride[1])
    n, c, oy, ox, ry, rx = sch.get_loops(pool)
    oy_out, oy_in = sch.split(oy, [None, _rows(layer)])
    if vector_rows:
        sch.reorder(n, oy_out, c, oy_in, ry, rx, ox)
    else:
        sch.reorder(n, oy_out, c, oy_in, ox, ry, rx)
    block = sch.fuse(n, oy_out)
    sch.parallel(block)
    if pad is not None:  # the block's conv rows inside the pool's -inf border: no bounds tests in the windows
        sch.compute_at(pad, block, preserve_unit_loops=True)
        vectorize_padding(sch, pad, phased, isa)
    # the conv rows the block's windows read, computed in the block: the epilogue (the consumers
    # first), then the conv, tiled by stem.py
    for name in reversed(layer.conv.epilogue):
        sch.compute_at(sch.get_sblock(name), block, preserve_unit_loops=True)
    sch.compute_at(sch.get_sblock(layer.conv.conv_block), block, preserve_unit_loops=True)
    stem.tile_rows(sch, layer.conv, isa, sample)
    sch.unroll(ry)
    sch.unroll(rx)
    if vector_rows:
        sch.vectorize(ox)
    sch.decompose_reduction(pool, ry)
