"""Pointwise (1x1, dense or grouped) ``shuffle_group_conv2d``: a register-tiled GEMM, NCHW.

Also the plain 1x1 convs with no shuffle in front (LegalizeOps' ``conv2d_nchw`` /
``group_conv2d_nchw``: V2's branch convs, V1's grouped 1x1 after the depthwise conv): there the
shuffle is the identity, and LegalizeOps' ``pad_temp`` copy (it pads nothing) is inlined.

What it does
------------
A 1x1 convolution over NCHW data is a GEMM per image: ``out[o, p] = sum_k W[o, k] * X[k, p]``
with ``p = y * W + x`` (the H x W plane is contiguous) and ``k`` the input channel read through
the shuffle. The graph stays NCHW end to end, so instead of converting to NCHWc (a transpose in
and out of every layer) the schedule vectorises along an axis that is already contiguous:

* **pixel-vector** (``P % lanes == 0``, e.g. 28x28, 56x56): a micro-tile of ``mr`` output
  channels x ``nr`` vectors of pixels, accumulators ``mr * nr`` vector registers; per ``k`` it
  loads ``nr`` vectors of ``X[k, p:p+nr*lanes]`` and broadcasts ``mr`` weights.
* **channel-vector** (``O % lanes == 0``, e.g. 7x7 and 14x14 planes whose pixel count 49 / 196
  no vector divides): a micro-tile of ``mv`` vectors of output channels x ``np`` pixels; per
  ``k`` it loads ``mv`` weight vectors and broadcasts ``np`` pixels. The weight is repacked to
  ``[O/lanes, K, lanes]`` by a block marked ``meta_schedule.layout_rewrite_preproc``, which the
  compiler splits off and folds into the (constant) weights at compile time
  (``SplitLayoutRewritePreproc`` + ``FoldConstant``), so it costs nothing at run time.
* a full vector divides neither: half-width vectors (4 floats on AVX2 for 196 pixels), or
  pixel vectors of fewer lanes that divide the plane (7-wide for 49 and 196 pixels).

The tile is the one doing the most useful lanes per reduction step (``accumulators x width``)
among those that divide the layer — a width that is not a power of two counting half, since
LLVM loads such a vector in pieces and shuffles them together (:func:`_load_cost`) — with at most ``registers - 2`` accumulators (the loaded
operands stream through the other two) — 16 ymm registers for AVX2 (8 floats), 32 q registers
for NEON (4 floats), so NEON gets twice the accumulators at half the width. On AVX-512 the tile
is AVX2's, except where 8 lanes cannot fill whole vectors: there it takes zmm vectors (16
floats, 32 registers; :func:`_choose`). The reduction is the whole ``k`` range inside the tile (``K``
<= 1024 here: a tile's ``X`` panel of ``K x 8..16`` floats stays in L1/L2).

The shuffle is in the index: the fused op's reduction is split ``k = rj * g + ri`` so the source
channel is ``ri * C/g + rj`` (affine), and consecutive ``rj`` read consecutive channels.

The epilogue (BN bias, ReLU, residual add) is inlined into one block that runs over the tile
right after its reduction, while the accumulators are still in registers/L1.

Parallelism: output-channel tiles over the cores in the channel-vector form; in the pixel-vector
form pixel tiles first (each core all output channels of its share of the plane) where a conv
group has fewer output channels than pixels (so its weights are fewer floats than its input),
else channel tiles first. Measured in the whole model (Xeon, Rocket Lake codegen, 2 threads,
interleaved rounds): V2 1x 2.84 -> 2.69 ms (-5.5%, 12 rounds; -6.5% and -6.8% in two more runs),
V1 g3 1x 2.57 -> 2.56 (20 rounds). Alone the kernels do not say so (two profile runs, not
interleaved): V2's 28x28 ones got faster (0.48 -> 0.32 ms the group), its 14x14 zmm ones slower
(0.52 -> 0.74), which in the model is a wash (those alone pixels-first: 2.82 against 2.84 ms).
``profile --in-model`` (the same two runs) put the gain in the 28x28 convs (0.49 -> 0.37 ms) and
in the concatenations that read the branch convs' output (0.41 -> 0.22). Splitting the
concatenations by pixels as well measured slower (2.95 ms), so which core wrote what is not the
whole story. Nor does the channel-vector form gain from it: each core taking pixel tiles there
(and streaming every weight) ran V1 g3 1x 2.55 -> 2.90 ms, V2 1x 2.69 -> 2.82 (hand builds, 12
interleaved rounds, 2026-12-02).
"""

from __future__ import annotations

from tvm.tirx import IndexMap

from tvmshuffle.schedules import split_factors

NAME = "pointwise"
_CANDIDATE_TILES = range(1, 33)


def matches(layer, isa) -> bool:
    return layer.kind == "pointwise" and _choose(layer, isa) is not None


def _divisors(n: int, limit: int) -> list[int]:
    return [d for d in _CANDIDATE_TILES if d <= limit and n % d == 0]


def _load_cost(width: int) -> int:
    """2 for a vector width that is not a power of two, else 1.

    LLVM loads a 7-float vector in pieces (4 + 2 + 1 floats) and shuffles them into one
    register, so each load of the tile costs three loads and two shuffles; on AVX2 the shuffles
    bind the tile below half the FMA rate. Measured (Xeon, Rocket Lake codegen, 2 threads): V2's
    shuffled 1x1 ``232>116`` at 14x14 ran 60 us with 7-wide pixel vectors, 49 us with 4-wide
    ones; ``464>232`` at 7x7 53 us with 7-wide pixel vectors, 35 us with 8-wide channel vectors
    (a tile of 7 accumulators against 14). So such a width counts for half its lanes.
    """
    return 1 if width & (width - 1) == 0 else 2


def _best_tile(layer, isa):
    """(form, width, rows, cols): the register tile doing the most useful lanes per ``k`` step.

    ``width`` is the vector length: the ISA's lanes, or fewer where they do not divide the
    layer (a 7-wide vector fills 7 of 8 AVX2 lanes: 49- and 196-pixel planes), or half.
    Accumulators (``rows * cols`` vector registers) stay <= registers - 2.
    """
    out_c = layer.out_channels
    pixels = layer.out_hw[0] * layer.out_hw[1]
    per_group = layer.out_per_group
    budget = isa.registers - 2
    options = []
    for width in range(isa.lanes, isa.lanes // 2 - 1, -1):
        if width < 2:
            continue
        if pixels % width == 0:  # pixel-vector: rows = output channels, cols = pixel vectors
            for nr in _divisors(pixels // width, budget):
                for mr in _divisors(out_c, budget):
                    if mr * nr <= budget:
                        options.append(("pixel", width, mr, nr))
        # channel-vector (rows = vectors of output channels): full or half vectors only
        if width in (isa.lanes, isa.lanes // 2) and out_c % width == 0 and per_group % width == 0:
            for mv in _divisors(out_c // width, budget):
                if per_group % (mv * width):
                    continue
                for np_ in _divisors(pixels, budget):
                    if mv * np_ <= budget:
                        options.append(("channel", width, mv, np_))
    if not options:
        return None

    def score(t):  # useful lanes per k, then fewest operand loads (a + b), then no packing
        form, width, a, b = t
        return (a * b * width // _load_cost(width), -(a + b), form == "pixel")

    return max(options, key=score)


def _choose(layer, isa):
    """:func:`_best_tile` at the ISA's width, or at its wide vectors (AVX-512's zmm: 16 floats,
    32 registers) where that width gives only partial vectors: V2's 116-channel 14x14 convs take
    4-float vectors under AVX2 (196 pixels, 116 channels: no multiple of 8) and 14-float zmm
    vectors here. Measured (Xeon, Rocket Lake codegen): ``116>116`` 48 -> 22 us alone (2 threads);
    the whole V2 1x model 3.19 -> 2.95 ms on 2 threads, 4.71 -> 3.82 ms on 1 (interleaved runs of
    one process). Every schedule at zmm width was slower in the model (4.27 ms on 1 thread),
    though each kernel alone was faster: hence zmm only here."""
    tile = _best_tile(layer, isa)
    wide = getattr(isa, "wide", None)
    if wide is not None and (tile is None or tile[1] < isa.lanes):
        return _best_tile(layer, wide) or tile
    return tile


def _pixels_first(layer) -> bool:
    """Whether the cores split a pixel-vector layer by pixels first (each core all output channels
    of its share of the plane): where a conv group has fewer output channels than pixels, so its
    weights are fewer floats than the input it reads (see "Parallelism" above)."""
    return layer.out_per_group < layer.out_hw[0] * layer.out_hw[1]


def pixel_tile(layer, isa) -> int | None:
    """The pixels one register tile covers in the pixel-vector form (a row block of the plane
    must hold whole tiles); None in the channel-vector form."""
    form, lanes, rows, cols = _choose(layer, isa)
    return cols * lanes if form == "pixel" else None


def apply(sch, layer, isa, sample: bool = False, block_rows: int | None = None):
    """Schedule the conv (see above). ``block_rows``: the plane is cut into blocks of that many
    rows first, the blocks over the cores (``dw_pointwise.py`` computes the depthwise conv
    that feeds the block right there); returns the blocks' loop then."""
    form, lanes, rows, cols = _choose(layer, isa)  # lanes: the vector width used
    conv = sch.get_sblock(getattr(layer, "conv_block", "shuffle_group_conv2d"))
    if getattr(layer, "pad_block", None):  # a plain 1x1 conv2d: LegalizeOps' pad_temp copies, pads nothing
        sch.compute_inline(sch.get_sblock(layer.pad_block))
    width = layer.out_hw[1]
    epilogue = [sch.get_sblock(name) for name in layer.epilogue]

    # One pixel axis p = y * W + x for the conv, its accumulator buffer and the epilogue, so a
    # tile of consecutive pixels is one contiguous range (tiles may span rows).
    # The accumulators (the conv's output buffer, a tile of it after compaction) are laid out
    # with the vector lanes innermost, so LLVM can keep them in vector registers.
    if form == "pixel":
        sch.transform_layout(conv, ("write", 0), lambda n, c, y, x: (n, c, y * width + x))
    else:
        sch.transform_layout(conv, ("write", 0),
                             lambda n, c, y, x: (n, c // lanes, y * width + x, c % lanes))
    sch.transform_block_layout(conv, IndexMap.from_func(
        lambda n, o, y, x, *red: (n, o, y * width + x, *red), ndim=4 + len(layer.reduction)))
    for block in epilogue[:-1]:
        sch.compute_inline(block)
    last = epilogue[-1] if epilogue else None
    if last is not None:
        sch.transform_block_layout(last, lambda n, c, y, x: (n, c, y * width + x))

    n, o, p, *red = sch.get_loops(conv)
    blocks = []
    if block_rows:
        block, p = sch.split(p, [None, block_rows * width])
        blocks = [block]
    if form == "pixel":
        o_out, o_in = sch.split(o, split_factors(sch, o, rows, sample))
        p_vecs, p_lane = sch.split(p, [None, lanes])
        p_out, p_vec = sch.split(p_vecs, split_factors(sch, p_vecs, cols, sample))
        outer = [p_out, o_out] if _pixels_first(layer) and not blocks else [o_out, p_out]
        sch.reorder(n, *blocks, *outer, *red, o_in, p_vec, p_lane)
        tile_loops, lane = [o_in, p_vec], p_lane
    else:
        o_blocks, o_lane = sch.split(o, [None, lanes])
        o_out, o_vec = sch.split(o_blocks, split_factors(sch, o_blocks, rows, sample))
        p_out, p_in = sch.split(p, split_factors(sch, p, cols, sample))
        outer = [o_out, p_out]
        sch.reorder(n, *blocks, *outer, *red, p_in, o_vec, o_lane)
        tile_loops, lane = [p_in, o_vec], o_lane
        # weight [O, K, 1, 1] -> [O/lanes, K, lanes], folded into the constant at compile time
        packed = sch.cache_read(conv, 1, "global")
        sch.transform_layout(packed, ("write", 0), lambda o, k, a, b: (o // lanes, k, o % lanes))
        sch.annotate(packed, "meta_schedule.layout_rewrite_preproc", 1)

    if last is not None:
        sch.reverse_compute_at(last, outer[-1], preserve_unit_loops=True)
        *_, e_chan, e_pix = sch.get_loops(last)
        # read the accumulators the way the conv wrote them (else LLVM keeps them in memory)
        # and unrolled, so that every accumulator index is a constant
        if form == "pixel":
            e_vec, e_lane = sch.split(e_pix, [None, lanes])
            sch.unroll(e_chan)
            sch.unroll(e_vec)
            sch.vectorize(e_lane)
        else:
            sch.reorder(e_pix, e_chan)
            e_vec, e_lane = sch.split(e_chan, [None, lanes])
            sch.unroll(e_pix)
            sch.unroll(e_vec)
            sch.vectorize(e_lane)
    for loop in tile_loops:
        sch.unroll(loop)
    sch.vectorize(lane)
    if blocks:  # the row blocks over the threads
        block = sch.fuse(n, *blocks)
        sch.parallel(block)
        sch.decompose_reduction(conv, red[0])
        return block
    # channel form: each thread walks all pixels of its channel tiles (their packed weights
    # stay in its cache); pixel form: the tiles over the threads, the outer of the two first
    sch.parallel(sch.fuse(n, o_out) if form == "channel" else sch.fuse(n, *outer))
    sch.decompose_reduction(conv, red[0])
    return None

