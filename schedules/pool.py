"""Max and average pooling (LegalizeOps' ``pool_max`` / ``pool_sum`` + ``pool_avg``), NCHW.

ShuffleNet pools after the stem (V1 and V2: max 3x3 stride 2 on 24 x 112 x 112) and, in V1,
in every stride-2 unit's shortcut (average 3x3 stride 2). TVM's kernel as lowered runs on one
thread and builds the padded copy of the whole input before any window: V1 g3 1x spent 0.29 ms
of its 3.0 ms in its four pools (Xeon, Rocket Lake codegen, 2 threads).

What it does
------------
* **Channels over the cores.** The channels are independent; each thread takes whole ones.
* **The padded plane per channel**, built right before that channel's windows (at most
  114 x 114 floats here: it is read back while still in L1/L2), not one padded copy of the
  whole input first. For stride 2 its columns are laid out in two phases
  (``[y][x % 2][x // 2]``) and written phase by phase (contiguous stores, stride-2 loads), so
  every window load is unit-stride; an odd number of padded columns keeps the plain plane.
* **Output rows as vectors**: for each of the window's taps, one vector load per row chunk.
* **The average's division on the row** right after its sums.

Measured on a Xeon (LLVM: rocketlake), 2 threads, kernels alone, median of 7 interleaved
rounds (the schedule before: scalar windows over a plain padded plane -> this): max 3x3/2 on
24 x 112 x 112 58 -> 42 us; average 3x3/2 on 240 x 28 x 28 60 -> 33 us, on 480 x 14 x 14
46 -> 15 us, on 24 x 56 x 56 16 -> 14 us (TVM as lowered: 103, 115, 48 and 23 us). An earlier
session tried the phases and vectorized rows apart and found each slower (a phased plane
97 us for the 240 x 28 x 28 average), probably writing the phases column by column, a
scattered store per float, as ``stem.py`` did before (its padding pass: 182 -> 163 us written
phase by phase). Accumulating in a local tile (as ``stem.py`` does) was slower here (37 and 20 us).
"""

from __future__ import annotations

from tvmshuffle.schedules import phase_columns, vectorize_padding

NAME = "pool"


def matches(layer, isa) -> bool:
    return layer.kind == "pool"


def apply(sch, layer, isa, sample: bool = False) -> None:
    pool = sch.get_sblock(layer.block)
    pad = sch.get_sblock(layer.pad_block) if layer.pad_block is not None else None
    phased = pad is not None and phase_columns(sch, pad, layer.stride[1])  # unit-stride window loads
    epilogue = [sch.get_sblock(name) for name in layer.epilogue]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    last = epilogue[-1] if epilogue else None

    n, c, oy, ox, ry, rx = sch.get_loops(pool)
    sch.reorder(n, c, oy, ry, rx, ox)
    channel = sch.fuse(n, c)
    if pad is not None:  # this channel's padded plane, right before its windows
        sch.compute_at(pad, channel)
        vectorize_padding(sch, pad, phased)
    if last is not None:  # the average's division, on the row just summed
        sch.reverse_compute_at(last, oy)
        *_, e_x = sch.get_loops(last)
        sch.vectorize(e_x)
    sch.unroll(ry)
    sch.unroll(rx)
    sch.vectorize(ox)
    sch.parallel(channel)
    sch.decompose_reduction(pool, ry)
