"""Going through an expression's sub-expressions (for the checker, spec/sites.py, lowering)."""
from __future__ import annotations

from . import ast as A


def walk_expr(e):
    """Every sub-expression of e, e first (iterative: no recursion limit)."""
    stack = [e]
    while stack:
        x = stack.pop()
        yield x
        if isinstance(x, A.Call):
            # a called name is checked as a function by the Call, not looked up as a value
            head = [] if isinstance(x.func, A.Name) else [x.func]
            stack.extend(reversed([*head, *x.args, *(k.value for k in x.kwargs)]))
        elif isinstance(x, A.BinOp):
            stack.extend([x.right, x.left])
        elif isinstance(x, A.Neg):
            stack.append(x.operand)
        elif isinstance(x, A.TupleExpr):
            stack.extend(reversed(x.items))
