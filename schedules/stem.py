"""A dense KxK conv on few input channels (the stem: 3 -> 24, 3x3, stride 2): direct, NCHW.

What it does
------------
The stem has too few input channels (3) for a GEMM over channels: per output, 27 multiply-adds
over (channel, ky, kx). TVM's lowering runs them one output at a time, 10-15 GFLOP/s untuned.

* **Row vectors, several output channels a tile.** Vectors run along the output row (``x``,
  ``chunk`` = 1-2 vectors); a tile holds ``rows`` output channels x ``chunk`` of one output
  row, ``rows`` x vectors accumulators (<= registers - 2). Each input vector loaded (one of the
  27 taps) is multiplied by ``rows`` broadcast weights: one load feeds ``rows`` FMAs.
* **The padded image once, in phases.** LegalizeOps' ``pad_temp`` (3 x 226 x 226 floats for the
  stem) is built once, vectorized and parallel; for stride 2 its columns are laid out in two
  phases (``[c][y][x % 2][x // 2]``), so every load of the conv is unit-stride. Folding the
  padding into the loads instead (``pad_temp`` inlined) measured slower than TVM untuned
  (1050 vs 764 us at 224x224: a select per load); the phase layout: 462 vs 796 us (Rocket
  Lake, 2 threads, shared machine, min of 9 samples; 31 vs 122 us at 64x64).
* The taps (channel, ky, kx) and the tile's channels are unrolled, so the accumulators stay in
  registers; the **epilogue** (bias, ReLU) runs on the tile right after it.
* **Parallel** over output-channel tiles and rows.
"""

from __future__ import annotations

from tvmshuffle.schedules import split_factors

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
    chunk, rows = _tile(layer, isa)
    conv = sch.get_sblock(layer.conv_block)
    pad = sch.get_sblock(layer.pad_block) if layer.pad_block else None
    if pad is not None and layer.stride[1] == 2:
        # phases: padded column x at [.., x % 2, x // 2], so stride-2 reads are unit-stride
        sch.transform_layout(pad, ("write", 0), lambda n, c, yy, xx: (n, c, yy, xx % 2, xx // 2))
    epilogue = [sch.get_sblock(name) for name in layer.epilogue]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    last = epilogue[-1] if epilogue else None

    n, o, y, x, *red = sch.get_loops(conv)
    o_out, o_in = sch.split(o, split_factors(sch, o, rows, sample))
    x_out, x_in = sch.split(x, [None, chunk])
    sch.reorder(n, o_out, y, x_out, *red, o_in, x_in)
    outer = sch.fuse(n, o_out, y)
    if last is not None:
        sch.reverse_compute_at(last, x_out, preserve_unit_loops=True)
        *_, e_o, e_x = sch.get_loops(last)
        sch.unroll(e_o)
        sch.vectorize(e_x)
    for loop in [*red, o_in]:
        sch.unroll(loop)
    sch.vectorize(x_in)
    sch.parallel(outer)
    sch.decompose_reduction(conv, red[0])
    if pad is not None:  # the padded image, once (3 x 226 x 226 floats for the stem)
        *p_outer, p_x = sch.get_loops(pad)
        sch.vectorize(p_x)
        sch.parallel(sch.fuse(*p_outer[:3]))
