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
* **The average's division on the channel** right after its sums.

Measured on that Xeon, 2 threads (TVM as lowered → this): max 3x3/2 on 24 x 112 x 112
103 → 59 us; average 3x3/2 on 240 x 28 x 28 115 → 60 us, on 24 x 56 x 56 23 → 15 us, on
480 x 14 x 14 48 → 46 us.

Tried and slower here, so not done: vectorizing each output row (its stride-2 window loads
are gathers: 71 us for the 240 x 28 x 28 average), and storing the padded plane's even and odd
columns apart so those loads are unit-stride (97 us there, 148 us for the max pool: building
the phased plane costs more than it saves). Why the phased plane is slow to build is not
established; ``tvmshuffle profile`` shows the pools' share of a model.
"""

from __future__ import annotations

NAME = "pool"


def matches(layer, isa) -> bool:
    return layer.kind == "pool"


def apply(sch, layer, isa, sample: bool = False) -> None:
    pool = sch.get_sblock(layer.block)
    epilogue = [sch.get_sblock(name) for name in layer.epilogue]
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    last = epilogue[-1] if epilogue else None

    n, c, oy, ox, ry, rx = sch.get_loops(pool)
    sch.reorder(n, c, oy, ry, rx, ox)
    channel = sch.fuse(n, c)
    if layer.pad_block is not None:
        sch.compute_at(sch.get_sblock(layer.pad_block), channel)
    if last is not None:
        sch.reverse_compute_at(last, channel)
    sch.unroll(ry)
    sch.unroll(rx)
    sch.parallel(channel)
    sch.decompose_reduction(pool, ry)
