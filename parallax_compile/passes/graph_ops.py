"""What a few ATen nodes mean, for every pass: dropout that is the identity, ops that draw random
numbers, and sizes compared without guards.

An exported eval-mode graph keeps ``dropout(x, p, train=False)``; it is the identity (as is
``p == 0``), so matching looks through it and replaying it is exact. Any other dropout, and every op
of :data:`RANDOM_OPS`, draws new numbers on each call: a region or a query chain containing one
cannot be verified or replayed.

Sizes in ``node.meta["val"].shape`` are ints or ``SymInt`` s (dynamic dims). ``a == b`` on a
``SymInt`` installs a guard that can pin a dynamic length; :func:`same_size` compares the
expressions instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx

if TYPE_CHECKING:
    import sympy

aten = torch.ops.aten

DROPOUTS = {aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default}
"""``dropout(x, p, train)``: the identity when inactive (:func:`is_inactive_dropout`), random otherwise."""
RANDOM_OPS = {
    aten.native_dropout.default, aten.bernoulli.default, aten.bernoulli.p, aten.rand_like.default,
    aten.randn_like.default, aten.rand.default, aten.randn.default,
}
"""Ops that draw random numbers on every call, whatever their arguments (``native_dropout`` is
what training-mode dropout decomposes to)."""


def dropout_args(node: fx.Node) -> tuple[Any, Any]:
    """``(p, train)`` of a :data:`DROPOUTS` node (``train`` defaults to True)."""
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return p, train


def is_inactive_dropout(node: fx.Node) -> bool:
    """``dropout(x, p, train=False)`` or ``p == 0``: the identity, not random."""
    if node.op != "call_function" or node.target not in DROPOUTS:
        return False
    p, train = dropout_args(node)
    return train is False or p == 0


def is_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers: an op of :data:`RANDOM_OPS` or an active dropout."""
    if node.op != "call_function":
        return False
    return node.target in RANDOM_OPS or (node.target in DROPOUTS and not is_inactive_dropout(node))


def size_expr(d) -> sympy.Basic | None:
    """The sympy expression of a size (an int or a ``SymInt``), None for anything else."""
    import sympy

    if isinstance(d, torch.SymInt):
        return d.node.expr
    if isinstance(d, (int, bool)):
        return sympy.Integer(int(d))
    return d if isinstance(d, sympy.Basic) else None


def same_size(a, b) -> bool:
    """Whether two sizes (ints, ``SymInt`` s or their sympy expressions) are equal for every value of
    the symbols: their expressions are compared, so no guard is installed."""
    import sympy

    if a is b and a is not None:
        return True
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    ea, eb = size_expr(a), size_expr(b)
    return ea is not None and eb is not None and sympy.expand(ea - eb) == 0


def same_shape(a, b) -> bool:
    """Two shapes (tuples of sizes, or None) of the same rank with :func:`same_size` dims."""
    return a is not None and b is not None and len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))
