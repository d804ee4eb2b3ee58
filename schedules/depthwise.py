"""Depthwise KxK (3x3, stride 1 or 2) ``shuffle_group_conv2d``: row vectors, NCHW.

Also the plain depthwise convs with no shuffle in front (LegalizeOps' ``group_conv2d_nchw``,
e.g. V2's depthwise 3x3 after a 1x1 conv): its ``pad_temp`` stands for ``shuffle_pad``.

What it does
------------
A depthwise conv has no reduction over channels: 9 multiply-adds per output, each input read
~9 times (stride 1). Output channel ``o`` reads one input channel, ``(o % g) * C/g + o // g``:
the shuffle is a per-channel choice of plane, so it costs nothing once the plane is chosen.

* **One padded plane per channel, in cache** (stride 1). The ``shuffle_pad`` stage (zero border around the
  *unshuffled* data) is computed per output channel, just for the plane that channel reads
  (``compute_at`` under the channel loop): (H+2) x (W+2) floats, <= 13 KB at 56x56, in L1.
  The full padded tensor is never written.
* **Vectors along the output row.** The graph is NCHW; blocking channels (NCHWc) for a
  depthwise conv would need a transpose in and out whose cost equals the conv's own 9 MACs per
  element. An output row is contiguous, so the vector runs along ``x``: the row (7, 14, 28
  floats, or a chunk of a longer one) is one vector expression that LLVM splits into
  ymm/q registers (7 and 14 are not multiples of 8/4: the tail uses narrower registers).
* **Stride 2** reads every other column. Stride-2 layers spent most of their time building the
  padded plane (4x the outputs), so by default the padding is folded into the loads (``pad``
  inlined: a select on the border) and no plane is built. Measured on V2's plain stride-2
  depthwise convs (Rocket Lake, 2 threads, a shared machine; min of 15 samples): 58@56>28
  201 -> 120 us, 24@56>28 52 -> 31, 116@28>14 52 -> 30, 232@14>7 14.4 -> 13.3. The row vectors
  then load every other float: LLVM makes that a deinterleaving load on NEON (``ld2``), but on
  x86 a gather or, without one (the ``host`` preset's ``+prefer-no-gather``), a scalar load and
  insert per lane. So on x86, rows of at least two vectors (56>28) take the form of
  ``pool.py``'s wide rows instead: the channel's padded plane (contiguous vector copies) and
  the output row as a scalar loop with the taps unrolled, which LLVM's loop vectorizer turns
  into whole-vector loads de-interleaved by shuffles. Measured (AMD EPYC, ``znver4``, 2 threads,
  kernels alone, 8 interleaved rounds): 58@56>28 47 -> 27 us, 24@56>28 20 -> 10; the same form
  for 14- and 7-wide rows was slower (116@28>14 15 -> 29, 232@14>7 8 -> 12), as the plane was
  in the Xeon measurement above. A phase-split plane (``[y][x % 2][x // 2]``, every load
  unit-stride) was tried earlier and measured no consistent gain.
* **Register tile.** ``ty`` output rows at a time (``ty`` x vectors-per-row accumulators, at most
  registers - 2: 14 ymm for AVX2, 30 q for NEON); the 9 weights of the channel are broadcast
  once per tile; the kernel loops (``ky``, ``kx``) and the tile rows are unrolled so that LLVM
  keeps the accumulators in registers and reuses each loaded input row for every output row
  that needs it.
* **Epilogue** (BN bias, ReLU, residual add) inlined into one block over the tile right after it.
* **Parallel** over channels.
"""

from __future__ import annotations

from tvmshuffle.schedules import split_factors

NAME = "depthwise"


def matches(layer, isa) -> bool:
    return layer.kind == "depthwise" and layer.padded and layer.stride[0] == layer.stride[1] in (1, 2)


def tile(layer, isa) -> tuple[int, int]:
    """(row chunk width, rows per tile)."""
    out_h, out_w = layer.out_hw
    # the row chunk: the whole row up to 4 vectors, else the largest divisor that fits
    limit = 4 * isa.lanes
    chunk = out_w if out_w <= limit else max(d for d in range(1, limit + 1) if out_w % d == 0)
    vectors = -(-chunk // isa.lanes)
    rows = max(d for d in range(1, out_h + 1) if out_h % d == 0 and d * vectors <= isa.registers - 2)
    return chunk, rows


def llvm_rows(layer, isa) -> bool:
    """Whether the output rows are LLVM's to vectorize (see "Stride 2" above): stride 2 on x86,
    rows of at least two vectors."""
    return layer.stride[0] == 2 and not isa.deinterleaving_loads and layer.out_hw[1] >= 2 * isa.lanes


def apply(sch, layer, isa, sample: bool = False) -> None:
    conv = sch.get_sblock(getattr(layer, "conv_block", "shuffle_group_conv2d"))
    pad = sch.get_sblock(getattr(layer, "pad_block", None) or "shuffle_pad")  # or a plain conv2d's pad_temp
    epilogue = [sch.get_sblock(name) for name in layer.epilogue]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    last = epilogue[-1] if epilogue else None
    if llvm_rows(layer, isa):
        _scalar_rows(sch, conv, pad, last)
    else:
        _row_vectors(sch, layer, isa, conv, pad, last, sample)


def _scalar_rows(sch, conv, pad, last) -> None:
    """The channel's padded plane, then each output row a scalar loop over the unrolled taps."""
    n, o, y, x, *red = sch.get_loops(conv)
    channel = sch.fuse(n, o)
    sch.compute_at(pad, channel, preserve_unit_loops=True)
    *_, pad_x = sch.get_loops(pad)
    sch.vectorize(pad_x)
    if last is not None:  # the epilogue on the row just computed
        sch.reverse_compute_at(last, y, preserve_unit_loops=True)
    for loop in red:
        sch.unroll(loop)
    sch.parallel(channel)
    sch.decompose_reduction(conv, red[0])


def _row_vectors(sch, layer, isa, conv, pad, last, sample: bool) -> None:
    """The register tile of row vectors (see "Register tile" above), parallel over channels."""
    n, o, y, x, *red = sch.get_loops(conv)
    channel = sch.fuse(n, o)
    x_out = row_tiles(sch, layer, isa, conv, pad, channel, y, x, red, sample)
    if last is not None:
        sch.reverse_compute_at(last, x_out, preserve_unit_loops=True)
        *_, e_x = sch.get_loops(last)
        sch.vectorize(e_x)
    sch.parallel(channel)
    sch.decompose_reduction(conv, red[0])


def row_tiles(sch, layer, isa, conv, pad, channel, y, x, red, sample: bool, rows_of: int | None = None):
    """Tile one channel's output rows ``y`` x columns ``x`` of ``conv`` (its loops under the
    channel loop ``channel``, ``red`` its reduction loops) in registers; the padding per channel
    (stride 1) or folded into the loads (stride 2). ``rows_of``: the rows come in blocks of that
    many (``dw_pointwise.py``), which the tile's rows divide. Returns the loop over a tile's
    row chunks (where an epilogue goes)."""
    chunk, rows = tile(layer, isa)
    if rows_of is not None:
        rows = max(d for d in range(1, rows_of + 1) if rows_of % d == 0 and d <= rows)
    y_out, y_in = sch.split(y, split_factors(sch, y, rows, sample))
    x_out, x_in = sch.split(x, [None, chunk])
    sch.reorder(y_out, x_out, *red, y_in, x_in)
    if layer.stride[0] == 2:
        sch.compute_inline(pad)  # the padding folded into the loads: no plane is built
    else:
        sch.compute_at(pad, channel, preserve_unit_loops=True)  # this channel's padded plane only
        *_, pad_x = sch.get_loops(pad)
        sch.vectorize(pad_x)
    for loop in [*red, y_in]:
        sch.unroll(loop)
    sch.vectorize(x_in)
    return x_out
