"""SVDiff (arXiv 2303.11305): a fine-tune stored as shifts δ of the base weight's singular values.

W' = U diag(ReLU(σ + δ)) Vᵀ with W = U diag(σ) Vᵀ the full (thin) SVD of the weight flattened to
(out, in·kh·kw), which is what svdiff-pytorch computes (δ scaled by its layer's ``scale``, 1 by
default; the files store δ). The shifts need every singular value, so this is a full SVD, not the
engine's top-k bases; it runs in float64.

A spectral port applies the same δ to the target's own spectrum: W'_tgt = U_t diag(ReLU(σ_t + δ)) V_tᵀ.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.errors import ConversionError


def full_svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(weight.reshape(weight.shape[0], -1).double(), full_matrices=False)


def shifted_weight(weight: torch.Tensor, delta: torch.Tensor, basis: Optional[tuple] = None) -> torch.Tensor:
    """W' = U diag(ReLU(σ + δ)) Vᵀ, float64, the weight's shape."""
    U, S, Vh = basis if basis is not None else full_svd(weight)
    if delta.numel() != S.numel():
        raise ConversionError(f"{delta.numel()} spectral shifts for a weight of {S.numel()} singular values")
    sigma = torch.relu(S + delta.reshape(-1).double())
    return ((U * sigma) @ Vh).reshape(weight.shape)
