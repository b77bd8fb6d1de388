"""``lora-x`` (LoRA-X, arXiv 2501.16559): ΔW_t = U_t U_tᵀ ΔW_s V_t V_tᵀ with the target's top-k bases.

Keeps only the part of ΔW inside the target weight's top-k row and column subspaces, so even an
identical target does not return ΔW (unless ΔW already lies in that subspace, as for LoRA-X's own
subspace-constrained adapters).
"""

from __future__ import annotations

from torch import Tensor

from ..bases import Basis
from .base import Projection, check_same_shape, finish, fit_k, prepare, require


def project(
    up: Tensor,
    down: Tensor,
    *,
    source: Basis | None = None,
    target: Basis | None,
    rank: int,
    k: int | None = None,
) -> Projection:
    """Project ΔW = up @ down onto the target's top-k subspaces (``k`` ≤ the basis' k)."""
    up, down = prepare(up, down)
    target = require(target, "target", "lora-x")
    check_same_shape("lora-x", (up.shape[0], down.shape[1]), source, target)
    t = fit_k(target, k, up.device)
    new_up = t.U @ (t.U.T @ up)
    new_down = (down @ t.V) @ t.V.T
    notes = [f"projected onto target top-{t.k} subspaces"]
    return finish("lora-x", up, down, new_up, new_down, rank, source, target, notes)
