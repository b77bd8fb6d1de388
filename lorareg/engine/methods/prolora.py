"""ProLoRA (arXiv 2506.04244) and a four-block variant.

Notation: P_s = U_s U_sᵀ, Q_s = V_s V_sᵀ (source top-k), P_t, Q_t (target), P⊥ = I − P.

``prolora`` (as published, two terms): the in-subspace part ΔW∥ = P_s ΔW Q_s and the remainder
ΔW⊥ = ΔW − ΔW∥ are projected onto the target's subspace and null space respectively:
    ΔW_t = P_t ΔW∥ Q_t + P_t⊥ ΔW⊥ Q_t⊥.
The mixed blocks (top rows × rest columns and vice versa) of ΔW⊥ are dropped, so an identical
target does not return ΔW.

``prolora-full``: every block of ΔW = Σ_{a,b} P_s^a ΔW Q_s^b (a, b ∈ {top, rest}) is mapped onto the
target's corresponding block, Σ_{a,b} P_t^a P_s^a ΔW Q_s^b Q_t^b. The sum factorises:
    ΔW_t = M_out ΔW M_in,  M_out = P_t P_s + P_t⊥ P_s⊥,  M_in = Q_s Q_t + Q_s⊥ Q_t⊥,
so the result is rank ≤ r, and an identical target (P_t = P_s, Q_t = Q_s) returns ΔW exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bases import Basis
from .base import Projection, check_same_shape, finish, fit_k, prepare, require


def _bases(up, down, source, target, k, name):
    source = require(source, "source", name)
    target = require(target, "target", name)
    check_same_shape(name, (up.shape[0], down.shape[1]), source, target)
    kk = min(source.k, target.k) if k is None else min(k, source.k, target.k)
    return source, target, fit_k(source, kk, up.device), fit_k(target, kk, up.device)


def project(
    up: Tensor,
    down: Tensor,
    *,
    source: Basis | None,
    target: Basis | None,
    rank: int,
    k: int | None = None,
) -> Projection:
    """Published two-term ProLoRA projection, in low-rank form (3r-column sum, recompressed)."""
    up, down = prepare(up, down)
    source, target, s, t = _bases(up, down, source, target, k, "prolora")
    # ΔW∥ = [U_s U_sᵀ B] [A V_s V_sᵀ]
    par_up = s.U @ (s.U.T @ up)
    par_down = (down @ s.V) @ s.V.T
    # term 1: P_t ΔW∥ Q_t
    t1_up = t.U @ (t.U.T @ par_up)
    t1_down = (par_down @ t.V) @ t.V.T
    # term 2: P_t⊥ (ΔW − ΔW∥) Q_t⊥, with ΔW − ΔW∥ = [B, −par_up] [A; par_down]
    L = torch.cat([up, -par_up], dim=1)
    R = torch.cat([down, par_down], dim=0)
    t2_up = L - t.U @ (t.U.T @ L)
    t2_down = R - (R @ t.V) @ t.V.T
    new_up = torch.cat([t1_up, t2_up], dim=1)
    new_down = torch.cat([t1_down, t2_down], dim=0)
    notes = [f"two-term ProLoRA projection with k={s.k}"]
    return finish("prolora", up, down, new_up, new_down, rank, source, target, notes)


def project_full(
    up: Tensor,
    down: Tensor,
    *,
    source: Basis | None,
    target: Basis | None,
    rank: int,
    k: int | None = None,
) -> Projection:
    """Four-block variant: ΔW_t = M_out ΔW M_in (identity on an identical target)."""
    up, down = prepare(up, down)
    source, target, s, t = _bases(up, down, source, target, k, "prolora-full")

    def side(X: Tensor, Us: Tensor, Ut: Tensor) -> Tensor:
        # (P_t P_s + P_t⊥ P_s⊥) X = P_t P_s X + (X − P_s X) − P_t (X − P_s X)
        PsX = Us @ (Us.T @ X)
        rest = X - PsX
        return Ut @ (Ut.T @ PsX) + rest - Ut @ (Ut.T @ rest)

    new_up = side(up, s.U, t.U)
    new_down = side(down.T, s.V, t.V).T
    notes = [f"four-block projection with k={s.k}"]
    return finish("prolora-full", up, down, new_up, new_down, rank, source, target, notes)
