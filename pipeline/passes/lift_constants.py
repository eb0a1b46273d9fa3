"""LiftConstantsToParams: turn the weight constants of `main` back into trailing parameters.

Passes run on bound weights (so BN folding and layout transposes fold into them); the exported library
should not carry them inside the `.so`, so after the passes every non-scalar constant of `main` becomes
a parameter after the real inputs, and its value goes to the artifact's params file.
"""

from __future__ import annotations

import numpy as np


def LiftConstantsToParams(mod, min_elements: int = 2):
    """Returns (new_mod, {param_name: ndarray}) for `mod["main"]`."""
    import tvm
    from tvm import relax

    lifted: dict[object, relax.Var] = {}
    values: dict[str, np.ndarray] = {}

    @relax.expr_functor.mutator
    class _Lifter(relax.PyExprMutator):
        def visit_generic_const_(self, op):
            value = op.value
            if not hasattr(value, "shape") or int(np.prod(value.shape)) < min_elements:
                return op
            if op not in lifted:
                name = f"param_{len(lifted)}"
                lifted[op] = relax.Var(name, op.ty)
                values[name] = value.numpy()
            return lifted[op]

    func = mod["main"]
    body = _Lifter(mod).visit_expr(func.body)
    new_func = relax.Function(list(func.params) + list(lifted.values()), body, func.ret_ty,
                              func.is_pure, func.attrs)
    out = tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs)
    out["main"] = new_func
    return relax.transform.Normalize()(out), values
