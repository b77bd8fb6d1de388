"""Projection methods. All share one signature::

    project(up [m, r], down [r, n], *, source: Basis | None, target: Basis | None, rank: int,
            **params) -> Projection

and return fp32 factors of rank ≤ ``rank`` (low-rank arithmetic only, recompressed with
:func:`lorareg.engine.lowrank.recompress`). The LoRA scale (alpha / rank) is applied by the caller.
"""

from __future__ import annotations

from collections.abc import Callable

from . import align as _align
from . import copy as _copy
from . import lora_x as _lora_x
from . import prolora as _prolora
from .base import MissingBasisError, PortError, Projection, ShapeMismatchError


ProjectFn = Callable[..., Projection]

METHODS: dict[str, ProjectFn] = {
    "copy": _copy.project,
    "lora-x": _lora_x.project,
    "prolora": _prolora.project,
    "prolora-full": _prolora.project_full,
    "align": _align.project,
}

#: Recommended default where shapes match (docs/methods.md): no training-free projection measured
#: better than copy on same-shape pairs, and a default must never do worse than copy.
DEFAULT_METHOD = "copy"
#: Recommended projection when one is wanted on same-shape layers: equals copy on an identical
#: target and is the closest of the projections to the ideal on perturbed targets.
DEFAULT_PROJECTION = "prolora-full"
#: The only method that handles layers whose shapes differ.
DEFAULT_MISMATCH_METHOD = "align"


def get_method(name: str) -> ProjectFn:
    try:
        return METHODS[name]
    except KeyError:
        raise PortError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


__all__ = [
    "METHODS",
    "DEFAULT_METHOD",
    "DEFAULT_PROJECTION",
    "DEFAULT_MISMATCH_METHOD",
    "get_method",
    "Projection",
    "PortError",
    "ShapeMismatchError",
    "MissingBasisError",
]
