"""A dense KxK conv on few input channels (the stem: 3 -> 24, 3x3, stride 2): direct, NCHW.

What it does
------------
The stem has too few input channels (3) for a GEMM over channels: per output, 27 multiply-adds
over (channel, ky, kx). TVM's lowering runs them one output at a time, 10-15 GFLOP/s untuned.

* **Row vectors, several output channels a tile.** Vectors run along the output row (``x``,
  ``chunk`` = 1-2 vectors); a tile holds ``rows`` output channels x ``chunk`` of one output
  row, ``rows`` x vectors accumulators (<= registers - 2). Each input vector loaded (one of the
  27 taps) is multiplied by ``rows`` broadcast weights: one load feeds ``rows`` FMAs.
* **The accumulators in a local tile** (``cache_write`` to ``local``, the epilogue reading it):
  at 224x224 the tiles tried up to 56 floats wide then all ran 85-97 us, where accumulating in
  the conv's global buffer (left to LLVM's alias analysis) ran 88, 135 or 680 us by the tile's
  shape. Tiles 112 floats wide stayed slow either way (320-430 us): this file's are 4-16 wide.
* **The padded image in phases, a few rows at a time.** For stride 2 the padded columns are laid
  out in two phases (``[c][y][x % 2][x // 2]``), so every load of the conv is unit-stride. On
  NEON they are written phase by phase (contiguous stores, stride-2 loads); on x86, where LLVM
  makes TVM's stride-2 vector loads a scalar load and insert per lane, a column pair at a time
  in a loop left to LLVM's loop vectorizer, which de-interleaves whole vectors with shuffles
  (:func:`~tvmshuffle.schedules.vectorize_padding`; AMD EPYC, ``znver4``, 2 threads, interleaved
  rounds: 129 -> 92 us at 224x224). Each output row builds
  the padded rows it reads (3 channels x 3 rows, 8 KB for the stem) right before its tiles, so
  they are in L1 when read; the rows two output rows share are built twice. Measured against
  LegalizeOps' ``pad_temp`` built whole in a pass of its own (3 x 226 x 226 floats, 613 KB) on
  a Xeon (LLVM: rocketlake), 2 threads, median of 7 rounds of 3 x 50 runs, interleaved: 182 us
  (that pass, its columns scattered to the phases) -> 163 (written phase by phase) -> 135 (a
  few rows at a time) -> 88 us with the local accumulators (TVM untuned: 725 us). Folding the
  padding into the loads instead (``pad_temp`` inlined) measured slower than TVM untuned in an
  earlier session (a select per load).
* The taps (channel, ky, kx) and the tile's channels are unrolled, so the accumulators stay in
  registers; the **epilogue** (bias, ReLU) runs on the tile right after it.
* **Parallel** over output rows (each row's tiles: all output channels x the row's chunks).
"""

from __future__ import annotations

from tvmshuffle.schedules import phase_columns, split_factors, vectorize_padding

NAME = "stem"


def _tile(layer, isa):
    """(chunk width, output channels per tile), or None."""
    out_w = layer.out_hw[1]
    budget = isa.registers - 2
    best = None
    for vectors in (2, 1):
        chunk = vectors * isa.lanes
        if out_w % chunk:
            continue
        for rows in range(1, budget // vectors + 1):
            if layer.out_channels % rows == 0 and (best is None or rows * vectors > best[1] * best[0] // isa.lanes):
                best = (chunk, rows)
    return best


def matches(layer, isa) -> bool:
    return (layer.kind == "other" and getattr(layer, "conv_groups", 0) == 1 and layer.group_in <= 8
            and layer.kernel[0] == layer.kernel[1] > 1 and layer.stride[0] == layer.stride[1] in (1, 2)
            and not layer.shuffled and _tile(layer, isa) is not None)


def apply(sch, layer, isa, sample: bool = False) -> None:
    tile_rows(sch, layer, isa, sample, parallel=True)


def tile_rows(sch, layer, isa, sample: bool = False, parallel: bool = False) -> None:
    """The conv's tiles, its epilogue and its padded rows, row by row, the rows over the cores
    if ``parallel`` (``conv_pool.py`` runs them inside a parallel block of pool rows)."""
    chunk, rows = _tile(layer, isa)
    conv = sch.get_sblock(layer.conv_block)
    pad = sch.get_sblock(layer.pad_block) if layer.pad_block else None
    phased = pad is not None and phase_columns(sch, pad, layer.stride[1])  # unit-stride stride-2 loads
    epilogue = [sch.get_sblock(name) for name in layer.epilogue]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    last = epilogue[-1] if epilogue else None

    acc = sch.cache_write(conv, 0, "local")  # the tile's accumulators (registers)
    loops = sch.get_loops(conv)  # (conv_pool.py: under its block loop) n, o, y, x, then the reduction
    *_, n, o, y, x = loops[:-len(layer.reduction)]
    red = loops[-len(layer.reduction):]
    o_out, o_in = sch.split(o, split_factors(sch, o, rows, sample))
    x_out, x_in = sch.split(x, [None, chunk])
    sch.reorder(n, y, o_out, x_out, *red, o_in, x_in)
    outer = sch.fuse(n, y)
    sch.reverse_compute_at(acc, x_out, preserve_unit_loops=True)
    if last is not None:  # the epilogue reads the accumulators, not a copy of them
        sch.compute_inline(acc)
        sch.reverse_compute_at(last, x_out, preserve_unit_loops=True)
    *_, e_o, e_y, e_x = sch.get_loops(last if last is not None else acc)  # the tile's (o, y, x)
    sch.unroll(e_o)
    sch.unroll(e_y)
    sch.vectorize(e_x)
    for loop in [*red, o_in]:
        sch.unroll(loop)
    sch.vectorize(x_in)
    if parallel:
        sch.parallel(outer)
    sch.decompose_reduction(conv, red[0])
    if pad is not None:  # the padded rows this output row reads, right before its tiles
        sch.compute_at(pad, outer)
        vectorize_padding(sch, pad, phased, isa)
