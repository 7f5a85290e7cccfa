"""One forward-mode Jacobian-vector product, the primitive of ADCM's partition and of sCT.

See docs/method.md#jacobian-vector-products.

:func:`jvp` evaluates ``fn`` once on dual tensors (``torch.autograd.forward_ad``) and returns the
primal output and its directional derivative. It computes exactly what ``torch.func.jvp`` does, with
parameters as constants, but without functorch's per-op transform dispatch: on the embedded default's
DDPM++ (1.26M parameters, batch 8, 2 CPU cores) one JVP takes 0.29 s instead of 0.40 s.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwad
from torch import Tensor

__all__ = ["jvp"]


def jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(fn(*primals), d/dε fn(primals + ε·tangents) at ε = 0), under ``no_grad``.

    Args:
        fn: a function of tensors returning one tensor; module parameters inside are constants.
        primals: the point.
        tangents: the direction, one tensor per primal (same shapes and dtypes).

    Returns:
        (output, its JVP); the JVP is zeros when the output does not depend on the primals.
    """
    if len(primals) != len(tangents):
        raise ValueError(f"need one tangent per primal, got {len(primals)} primals and {len(tangents)} tangents")
    with torch.no_grad(), fwad.dual_level():
        with warnings.catch_warnings():
            # PyTorch's first make_dual loads its forward-AD decompositions through the deprecated
            # torch.jit.script and warns about it: PyTorch's own call, nothing a user can act on.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
            duals = [fwad.make_dual(p, t.to(p.dtype)) for p, t in zip(primals, tangents, strict=True)]
        out, tangent = fwad.unpack_dual(fn(*duals))
    return out, torch.zeros_like(out) if tangent is None else tangent
