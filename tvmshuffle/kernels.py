"""What a lowered module is made of: one row per compiled kernel (PrimFunc).

Used by ``tvmshuffle inspect`` (and the profiler): kernel name, argument and output shapes,
MACs (read by :mod:`tvmshuffle.tir_analysis`), and whether the kernel is a *standalone
shuffle* — a kernel that moves a tensor through a transpose, the copy that
``FuseShuffleGroupConv`` exists to remove.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from . import tir_analysis


@dataclass
class Kernel:
    name: str
    inputs: list[list[int]]  # shapes of the tensor arguments (activations and weights)
    outputs: list[list[int]]  # one shape per output tensor (a split has several)
    macs: int  # multiply-accumulates of its reduction blocks (conv, matmul)
    standalone_shuffle: bool  # contains a transpose: a shuffle copy through memory
    fused_shuffle_conv: bool  # contains the fused shuffle_group_conv2d operator
    calls: int = 1  # how many times main calls it

    def as_dict(self) -> dict:
        return asdict(self)


def _shape(ty) -> list[int]:
    return [int(d) for d in ty.shape]


def _shapes(ty) -> list[list[int]]:
    fields = getattr(ty, "fields", None)
    return [_shape(f) for f in fields] if fields is not None else [_shape(ty)]


def list_kernels(mod) -> list[Kernel]:
    """One :class:`Kernel` per PrimFunc that ``main`` calls, in call order."""
    import tvm
    from tvm import relax

    rows: dict[str, Kernel] = {}

    def visit(expr):
        if not (isinstance(expr, relax.Call) and expr.op.same_as(tvm.ir.Op.get("relax.call_tir"))):
            return
        gvar = expr.args[0]
        if gvar.name_hint in rows:
            rows[gvar.name_hint].calls += 1
            return
        func = mod[gvar]
        blocks = tir_analysis.blocks(func)  # nested too: a scheduled module's kernels count
        names = [b.name_hint for b in blocks]
        args = [_shape(a.ty) for a in expr.args[1].fields]
        rows[gvar.name_hint] = Kernel(
            name=gvar.name_hint,
            inputs=args,
            outputs=_shapes(expr.ty),
            macs=tir_analysis.macs(blocks),
            standalone_shuffle=any("transpose" in n for n in names),
            fused_shuffle_conv=any("shuffle_group_conv2d" in n for n in names) or "shuffle_group_conv2d" in gvar.name_hint,
        )

    relax.analysis.post_order_visit(mod["main"], visit)
    return list(rows.values())
