"""Subspace similarity between orthonormal bases (LoRA-X / ProLoRA's Φ)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["subspace_similarity"]


def subspace_similarity(Ua: Tensor, Ub: Tensor) -> float:
    """Mean squared cosine of the principal angles between span(Ua) and span(Ub).

    ``‖Uaᵀ Ub‖_F² / min(k_a, k_b)`` for column-orthonormal ``Ua`` [n, k_a] and ``Ub`` [n, k_b].
    In [0, 1]: 1 when one subspace contains the other, ≈ max(k_a, k_b) / n for random subspaces.
    (Normalising by ``k_a·k_b`` instead, as one community attempt does, makes every score < 1/k.)
    """
    if Ua.ndim != 2 or Ub.ndim != 2:
        raise ValueError(f"expected 2-D bases, got {tuple(Ua.shape)} and {tuple(Ub.shape)}")
    if Ua.shape[0] != Ub.shape[0]:
        raise ValueError(
            f"bases live in different spaces: {Ua.shape[0]} vs {Ub.shape[0]} rows"
        )
    k = min(Ua.shape[1], Ub.shape[1])
    if k == 0:
        return 0.0
    dev = Ua.device
    M = Ua.to(torch.float32).T @ Ub.to(device=dev, dtype=torch.float32)
    val = float((M.double() ** 2).sum()) / k
    return min(1.0, max(0.0, val))
