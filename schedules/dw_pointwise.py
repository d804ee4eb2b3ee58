"""A depthwise KxK conv and the 1x1 conv that reads it, in one kernel (``FuseDepthwisePointwise``).

ShuffleNet V2's branch ``1x1 → dw3x3 → 1x1`` ends in a depthwise conv (+ its BN bias) whose
only reader is the next 1x1 conv, and V1's shuffled depthwise conv is read by a grouped 1x1
conv alone; the graph pass puts the two in one PrimFunc. This file
schedules it with the two schedules beside it, ``depthwise.py`` and ``pointwise.py``
(:func:`tvmshuffle.schedules.sibling`: a copied, edited directory uses its own):

* **interleaved** (``_block_rows`` gives a row count): the 1x1 conv's plane is cut into blocks
  of whole rows, the blocks over the cores; each block first computes the depthwise output
  it reads — all channels, its rows — into a buffer of its own (``compute_at``: TVM sizes it
  to the block, channels x rows x width, a few KB to a few tens of KB: L1), then runs the
  1x1 conv's register tiles over it. The depthwise output never goes to memory, and the two
  convs are one parallel region instead of two. Inside the block the depthwise conv is
  ``depthwise.py``'s: per channel its padded rows, row vectors, a few output rows a register
  tile, the taps unrolled, its bias on the rows just computed.
* **stage after stage** (no row count fits): the depthwise conv with ``depthwise.py``, then the
  1x1 conv with ``pointwise.py``, as the two kernels would be, in one call.

The block is the fewest rows that hold whole register tiles of the 1x1 conv (``pointwise.py``'s
tile: a multiple of its pixel count) and give every core some blocks.

Measured (Intel Xeon, LLVM ``emeraldrapids``, 2 threads; each kernel alone, interleaved against
the same kernel scheduled stage after stage, 10 rounds, medians): V2's ``58 28x28`` 56.6 against
63.4 us, ``116 14x14`` 63.9 against 84.4, ``116 28>14`` (stride 2) 58.8 against 95.0; V1 g3's
``60 28x28 > 240`` 85.5 against 94.6. Where the 1x1 conv takes channel vectors, interleaving
lost (V1's ``120 14x14 > 480`` 134 against 107 us: see :func:`_block_rows`), as it did on the
7x7 planes (7 row blocks: 121 against 111 us). In the whole model, against the two kernels
apart (interleaved rounds of one process, 16 rounds): V2 1x 3.89 against 3.97 ms, V1 g3 1x
3.07 against 3.09 ms, differences inside this machine's noise.
"""

from __future__ import annotations

from tvmshuffle.schedules import sibling

NAME = "dw_pointwise"
#: fewer blocks than this and the cores would idle at the end: V2's 7x7 plane (7 blocks of a
#: row) ran 121 us interleaved against 111 us stage after stage (2 threads: 4 blocks against 3)
MIN_BLOCKS = 8

depthwise = sibling(__file__, "depthwise")
pointwise = sibling(__file__, "pointwise")


def matches(layer, isa) -> bool:
    return (layer.kind == "dw_pointwise" and depthwise.matches(layer.depthwise, isa)
            and pointwise.matches(layer.pointwise, isa))


def _block_rows(layer, isa) -> int | None:
    """Rows per block: the fewest that hold whole 1x1 register tiles, if that leaves at least
    :data:`MIN_BLOCKS` blocks and the 1x1 conv takes its pixel-vector form; else None (stage
    after stage). In the channel-vector form a thread keeps its channel tiles' packed weights
    in cache while it walks the whole plane; cut into row blocks, each block streams them all
    again: V1 g3's 14x14 ``120>480`` ran 134 us interleaved, 107 us stage after stage."""
    height, width = layer.pointwise.out_hw
    tile = pointwise.pixel_tile(layer.pointwise, isa)
    if tile is None:
        return None
    for rows in range(1, height + 1):
        if height % rows == 0 and rows * width % tile == 0:
            return rows if height // rows >= MIN_BLOCKS else None
    return None


def apply(sch, layer, isa, sample: bool = False) -> None:
    rows = _block_rows(layer, isa)
    if rows is None or depthwise.llvm_rows(layer.depthwise, isa):
        depthwise.apply(sch, layer.depthwise, isa, sample)
        pointwise.apply(sch, layer.pointwise, isa, sample)
        return
    block = pointwise.apply(sch, layer.pointwise, isa, sample, block_rows=rows)
    _depthwise_in_block(sch, layer.depthwise, isa, block, rows, sample)


def _depthwise_in_block(sch, dw, isa, block, rows: int, sample: bool) -> None:
    """The depthwise conv's output for one row block, computed in that block (see above)."""
    conv = sch.get_sblock(dw.conv_block)
    pad = sch.get_sblock(dw.pad_block)
    epilogue = [sch.get_sblock(name) for name in dw.epilogue]
    for stage in epilogue[:-1]:
        sch.compute_inline(stage)
    last = epilogue[-1] if epilogue else None
    for stage in ([last] if last is not None else []) + [conv]:
        sch.compute_at(stage, block, preserve_unit_loops=True)

    loops = sch.get_loops(conv)
    red = loops[len(loops) - len(dw.reduction):]
    c, y, x = loops[len(loops) - len(dw.reduction) - 3:len(loops) - len(dw.reduction)]
    depthwise.row_tiles(sch, dw, isa, conv, pad, c, y, x, red, sample, rows_of=rows)
    if last is not None:  # the bias on the channel's rows just computed
        sch.reverse_compute_at(last, c, preserve_unit_loops=True)
        *_, e_x = sch.get_loops(last)
        sch.vectorize(e_x)
    sch.decompose_reduction(conv, red[0])
