"""``copy``: use the source LoRA unchanged on a same-shape target layer (the baseline)."""

from __future__ import annotations

from torch import Tensor

from ..bases import Basis
from .base import Projection, check_same_shape, finish, prepare


def project(
    up: Tensor,
    down: Tensor,
    *,
    source: Basis | None = None,
    target: Basis | None = None,
    rank: int,
) -> Projection:
    """Return ΔW unchanged (recompressed only when ``rank`` < r). Shapes must match."""
    up, down = prepare(up, down)
    check_same_shape("copy", (up.shape[0], down.shape[1]), source, target)
    r = up.shape[1]
    notes = []
    if rank < r:
        notes.append(f"recompressed from rank {r} to {rank} (best rank-{rank} approximation)")
    return finish("copy", up, down, up, down, rank, source, target, notes, compress=rank < r)
