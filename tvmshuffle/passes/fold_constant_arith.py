"""FoldConstantArith: evaluate arithmetic on constants with NumPy, before TVM's FoldConstant.

Pattern (all arguments constant, or variables bound to constants)::

    lv = R.add(c0, c1)            # add subtract multiply divide sqrt reshape permute_dims
    →  lv = R.const(c0 + c1)      # (a float32 scalar such as T.float32(1e-05) counts as constant)

Why: folding batch norm into the convolutions (``FoldBatchnormToConv2D`` +
``DecomposeOpsForInference``) leaves ~8 small arithmetic ops on constants per convolution.
TVM's ``FoldConstant`` evaluates each by legalizing it to TIR and building it with LLVM: about
400 builds and 25-35 s for one ShuffleNet, most of an import. NumPy does the same arithmetic
in float32 in milliseconds. Anything else (other ops, non-constant or non-float32 operands) is
left as it is, for ``FoldConstant``, which also inlines the folded constants into their users.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

_BINARY = {"relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
           "relax.divide": np.divide}
_UNARY = {"relax.sqrt": np.sqrt}


@relax.expr_functor.mutator
class _Folder(relax.PyExprMutator):
    def _constant(self, expr) -> np.ndarray | None:
        if isinstance(expr, relax.Var):
            expr = self.lookup_binding(expr)
        if isinstance(expr, tvm.tirx.FloatImm) and str(expr.ty) == "float32":  # e.g. batch norm's epsilon
            return np.float32(expr.value)
        value = getattr(expr, "value", None)  # a relax constant holds a runtime Tensor
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(value, tvm.runtime.Tensor) \
                and value.dtype == "float32":
            return value.numpy()
        return None

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        name = getattr(call.op, "name", None)
        if name not in _BINARY and name not in _UNARY and name not in ("relax.reshape", "relax.permute_dims"):
            return call
        value = self._constant(call.args[0])
        if value is None:
            return call
        if name in _BINARY:
            other = self._constant(call.args[1])
            if other is None:
                return call
            out = _BINARY[name](value, other)
        elif name in _UNARY:
            out = _UNARY[name](value)
        elif name == "relax.reshape":
            dims = getattr(call.args[1], "values", None)  # R.shape([...])
            if dims is None or not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
                return call
            out = value.reshape([int(d) for d in dims])
        else:  # permute_dims
            axes = call.attrs.axes
            out = np.transpose(value, None if axes is None else [int(a) for a in axes])
        return relax.const(np.ascontiguousarray(out, dtype="float32"))


@tvm.transform.module_pass(opt_level=0, name="FoldConstantArith")
class FoldConstantArith:
    """Evaluate float32 arithmetic on constants with NumPy (see the module docstring)."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        folder = _Folder(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                folder.builder_.update_func(gvar, folder.visit_expr(func))
        return folder.builder_.get()
