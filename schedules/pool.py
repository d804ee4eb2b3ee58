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
  whole input first.
* **The taps unrolled**, the average's division on the row right after its sums.

A stride-2 window reads every other float of a row. How that is best vectorized depends on how
LLVM lowers a strided vector load for the ISA, so the windows take one of two forms:

* **x86 (AVX2, AVX-512): windows as scalar loops, for LLVM's loop vectorizer.** On x86 LLVM
  makes TVM's strided vector load a gather or, without one (``+prefer-no-gather`` of the
  ``host`` preset; AVX2 CPUs such as ``znver1``), a scalar load and insert per lane. Left as a
  scalar loop, the output row becomes an interleaved access: whole vectors loaded and
  de-interleaved by shuffles (``vpermt2ps``, ``vpermpd``), as in MetaSchedule's records for
  these pools. Rows at least two vectors wide get a plain padded plane (contiguous vector
  copies, so the window loop has no bounds tests); narrower ones (14 and 7 outputs) fold the
  padding into the loads, since building a plane there costs as much as the windows. The
  division's loop is LLVM's too (vectorized by TVM, 7 wide, it made the 14x14 pool 5x slower).
* **NEON: vector windows over a phased plane.** Its columns are laid out in two phases
  (``[y][x % 2][x // 2]``) and written phase by phase, so each window load is one unit-stride
  vector. AArch64's LLVM lowers that plane's stride-2 copy with vector de-interleaves, and the
  scalar form above came out mostly scalar there (``fcsel``/``fadd`` on single floats in the
  compiled code; not timed: no ARM hardware here).

Measured (AMD EPYC, LLVM ``znver4``, 2 threads, kernels alone, interleaved rounds; the phased
plane of before -> the x86 form, MetaSchedule's record in brackets): max 3x3/2 on
24 x 112 x 112 59 -> 34 us [22]; average 3x3/2 on 24 x 56 x 56 16 -> 9 us [11], on
240 x 28 x 28 49 -> 35 [21], on 480 x 14 x 14 18 -> 15 [9]. Earlier (Xeon, Rocket Lake
codegen) the phased plane had taken the max pool from 58 to 42 us against a plain padded plane
with scalar windows, before ``+prefer-no-gather`` (TVM as lowered: 103 us).
"""

from __future__ import annotations

from tvmshuffle.schedules import phase_columns, vectorize_padding

NAME = "pool"


def matches(layer, isa) -> bool:
    return layer.kind == "pool"


def apply(sch, layer, isa, sample: bool = False) -> None:
    pool = sch.get_sblock(layer.block)
    pad = sch.get_sblock(layer.pad_block) if layer.pad_block is not None else None
    epilogue = [sch.get_sblock(name) for name in layer.epilogue]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    last = epilogue[-1] if epilogue else None
    # NEON (LLVM de-interleaves stride-2 vector loads): TVM vectorizes the output rows, over a
    # plane in two phases (unit-stride loads); x86: the output row loop (ox) stays scalar, LLVM's
    # to vectorize
    vector_rows = isa.deinterleaving_loads
    if pad is not None and not vector_rows and layer.out_hw[1] < 2 * isa.lanes:
        sch.compute_inline(pad)  # x86, narrow rows: the bounds tests in the loads
        pad = None
    phased = vector_rows and pad is not None and phase_columns(sch, pad, layer.stride[1])

    n, c, oy, ox, ry, rx = sch.get_loops(pool)
    if vector_rows:
        sch.reorder(n, c, oy, ry, rx, ox)
    channel = sch.fuse(n, c)
    if pad is not None:  # this channel's padded plane, right before its windows
        sch.compute_at(pad, channel)
        vectorize_padding(sch, pad, phased, isa)
    if last is not None:  # the average's division, on the row just summed
        sch.reverse_compute_at(last, oy)
        if vector_rows:
            *_, e_x = sch.get_loops(last)
            sch.vectorize(e_x)
    sch.unroll(ry)
    sch.unroll(rx)
    if vector_rows:
        sch.vectorize(ox)
    sch.parallel(channel)
    sch.decompose_reduction(pool, ry)
