"""What every projection method shares: the result type, the errors and the low-rank helpers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..bases import Basis
from ..lowrank import as_f32, energy, recompress_with_values
from ..similarity import subspace_similarity


class PortError(ValueError):
    """A LoRA factor pair cannot be ported with the requested method."""


class ShapeMismatchError(PortError):
    """Source/target/LoRA shapes are incompatible with the method."""


class MissingBasisError(PortError):
    """The method needs a source and/or target basis that was not given."""


@dataclass
class Projection:
    """Result of porting ΔW = up @ down (scale excluded; it commutes with every projection)."""

    up: Tensor  # [m_t, r'] fp32, r' ≤ rank
    down: Tensor  # [r', n_t] fp32
    method: str
    similarity: float | None  # min(similarity_out, similarity_in) where defined
    similarity_out: float | None  # ‖U_sᵀ U_t‖² / k (output side)
    similarity_in: float | None  # ‖V_sᵀ V_t‖² / k (input side)
    kept_energy: float  # ‖ΔW_out‖_F² / ‖ΔW_in‖_F²
    notes: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.up.shape[0]), int(self.down.shape[1]))


def prepare(up: Tensor, down: Tensor) -> tuple[Tensor, Tensor]:
    if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ShapeMismatchError(
            f"expected up [m, r] and down [r, n], got {tuple(up.shape)} and {tuple(down.shape)}"
        )
    up = as_f32(up)
    return up, as_f32(down, up.device)


def require(basis: Basis | None, which: str, method: str) -> Basis:
    if basis is None:
        raise MissingBasisError(f"method {method!r} needs a {which} basis")
    return basis


def fit_k(basis: Basis, k: int | None, device: torch.device) -> Basis:
    b = basis.truncate(min(k, basis.k)) if k is not None else basis
    return b.to(device)


def side_similarities(
    source: Basis | None, target: Basis | None
) -> tuple[float | None, float | None, float | None]:
    if source is None or target is None:
        return None, None, None
    s_out = s_in = None
    if source.shape[0] == target.shape[0]:
        s_out = subspace_similarity(source.U, target.U)
    if source.shape[1] == target.shape[1]:
        s_in = subspace_similarity(source.V, target.V)
    both = [s for s in (s_out, s_in) if s is not None]
    return (min(both) if both else None), s_out, s_in


def finish(
    method: str,
    up_in: Tensor,
    down_in: Tensor,
    up_out: Tensor,
    down_out: Tensor,
    rank: int,
    source: Basis | None,
    target: Basis | None,
    notes: list[str],
    *,
    compress: bool = True,
) -> Projection:
    if compress:
        up_out, down_out, s = recompress_with_values(up_out, down_out, rank)
        e_out = float((s**2).sum())  # ‖up_out down_out‖_F² = Σ σ² of the kept part
    else:
        e_out = energy(up_out, down_out)
    e_in = energy(up_in, down_in)
    kept = e_out / e_in if e_in > 0 else (1.0 if e_out == 0 else float("inf"))
    sim, s_out, s_in = side_similarities(source, target)
    return Projection(
        up=up_out.contiguous(),
        down=down_out.contiguous(),
        method=method,
        similarity=sim,
        similarity_out=s_out,
        similarity_in=s_in,
        kept_energy=kept,
        notes=notes,
    )


def check_same_shape(method: str, dw_shape: tuple[int, int], *bases: Basis | None) -> None:
    for name, b in zip(("source", "target"), bases):
        if b is not None and b.shape != dw_shape:
            raise ShapeMismatchError(
                f"method {method!r} needs same-shape layers: LoRA ΔW is {dw_shape}, {name} "
                f"weight is {b.shape}; use method 'align' for mismatched shapes"
            )
