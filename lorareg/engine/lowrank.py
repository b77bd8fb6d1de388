"""Low-rank arithmetic on LoRA factors (up [m, R], down [R, n]); never forms the dense m×n product."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["recompress", "recompress_with_values", "energy", "diff_energy", "relative_error", "as_f32"]


def as_f32(t: Tensor, device: torch.device | str | None = None) -> Tensor:
    return t.detach().to(device=device if device is not None else t.device, dtype=torch.float32)


def _check(up: Tensor, down: Tensor) -> None:
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(
            f"expected up [m, R] and down [R, n], got {tuple(up.shape)} and {tuple(down.shape)}"
        )


def recompress_with_values(up: Tensor, down: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`recompress` that also returns the kept singular values of ``up @ down`` (fp64)."""
    _check(up, down)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    up = as_f32(up)
    down = as_f32(down, up.device)
    Qa, Ra = torch.linalg.qr(up)  # [m, a], [a, R]
    Qb, Rb = torch.linalg.qr(down.T)  # [n, b], [b, R]
    core = Ra.double() @ Rb.double().T  # [a, b], tiny: fp64 for free
    X, s, Yh = torch.linalg.svd(core, full_matrices=False)
    r = min(rank, s.shape[0])
    root = s[:r].sqrt()
    new_up = Qa @ (X[:, :r] * root).to(torch.float32)
    new_down = (root[:, None] * Yh[:r]).to(torch.float32) @ Qb.T
    return new_up.contiguous(), new_down.contiguous(), s[:r]


def recompress(up: Tensor, down: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factorisation of ``up @ down`` (optimal in Frobenius norm).

    QR of each side, SVD of the small core ``R_up R_downᵀ`` (fp64), truncation to ``rank``;
    singular values are split as sqrt on each side so both factors have balanced magnitudes.
    Exact when ``rank >= rank(up @ down)``. Returns fp32 factors with ``min(rank, R, m, n)``
    columns/rows. Cost O((m + n) R² + R³); the m×n product is never formed.
    """
    new_up, new_down, _ = recompress_with_values(up, down, rank)
    return new_up, new_down


def energy(up: Tensor, down: Tensor) -> float:
    """‖up @ down‖_F² via the R×R Gram matrices: tr((upᵀup)(down downᵀ))."""
    _check(up, down)
    up = up.double()
    down = down.to(device=up.device, dtype=torch.float64)
    return float(((up.T @ up) * (down @ down.T)).sum().clamp_min(0.0))


def diff_energy(up1: Tensor, down1: Tensor, up2: Tensor, down2: Tensor) -> float:
    """‖up1 down1 − up2 down2‖_F² in low-rank form (shapes of the products must match)."""
    dev = up1.device
    up = torch.cat([up1.double(), -up2.to(device=dev, dtype=torch.float64)], dim=1)
    down = torch.cat([down1.to(dev, torch.float64), down2.to(dev, torch.float64)], dim=0)
    return energy(up, down)


def relative_error(up: Tensor, down: Tensor, ref_up: Tensor, ref_down: Tensor) -> float:
    """‖ΔW − ΔW_ref‖_F / ‖ΔW_ref‖_F, both given as factors."""
    ref = energy(ref_up, ref_down)
    d = diff_energy(up, down, ref_up, ref_down)
    if ref == 0.0:
        return 0.0 if d == 0.0 else float("inf")
    return (d / ref) ** 0.5
