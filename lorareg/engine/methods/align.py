"""``align`` (Cross-LoRA style, arXiv 2508.05232): least-squares alignment of the source's top-k
bases to the target's, for layers whose shapes may differ.

P_out = argmin_P ‖P U_s − U_t D‖_F = U_t D U_sᵀ (U_s has orthonormal columns), likewise
P_in = V_t D V_sᵀ, and ΔW_t = P_out ΔW_s P_inᵀ = U_t D (U_sᵀ B)(A V_s) D V_tᵀ: the source LoRA's
coordinates in the source's top-k singular directions are re-used on the target's i-th singular
directions (k = min of both bases and the ``k`` argument). The result already lies inside the
target's top-k subspaces, so Cross-LoRA's subsequent projection onto them changes nothing.

D is a diagonal ±1 matrix fixing the SVD sign ambiguity (each (u_i, v_i) pair is only defined up
to a joint sign): d_i = sign(u_s,iᵀ u_t,i + v_s,iᵀ v_t,i) over the sides whose dimensions agree; when
no side agrees, the bases' canonical signs are used (largest |entry| of u_i positive).

Identical shapes and an identical target: P_out = P_s, P_in = Q_s, so ``align`` equals ``lora-x``
with the source basis (only the top-k part of ΔW survives). A target whose output space is
rotated, W_t = Q W_s, gives U_t = Q U_s D, V_t = V_s D, hence ΔW_t = Q P_s ΔW Q_s: the rotation is
recovered on the top-k part (the other methods cannot rotate at all).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..bases import Basis
from .base import Projection, ShapeMismatchError, finish, fit_k, prepare, require


def project(
    up: Tensor,
    down: Tensor,
    *,
    source: Basis | None,
    target: Basis | None,
    rank: int,
    k: int | None = None,
    fix_signs: bool = True,
) -> Projection:
    up, down = prepare(up, down)
    source = require(source, "source", "align")
    target = require(target, "target", "align")
    dw = (up.shape[0], down.shape[1])
    if source.shape != dw:
        raise ShapeMismatchError(
            f"method 'align': LoRA ΔW is {dw} but the source weight is {source.shape}"
        )
    kk = min(source.k, target.k) if k is None else min(k, source.k, target.k)
    s = fit_k(source, kk, up.device)
    t = fit_k(target, kk, up.device)
    notes = [f"least-squares basis alignment with k={kk}"]
    d = torch.ones(kk, dtype=torch.float32, device=up.device)
    if fix_signs:
        score = torch.zeros(kk, dtype=torch.float32, device=up.device)
        sides = []
        if s.shape[0] == t.shape[0]:
            score += (s.U * t.U).sum(0)
            sides.append("output")
        if s.shape[1] == t.shape[1]:
            score += (s.V * t.V).sum(0)
            sides.append("input")
        if sides:
            d = torch.where(score < 0, -1.0, 1.0)
            notes.append(f"signs matched on the {' and '.join(sides)} side")
        else:
            notes.append("no side has equal dimensions: canonical singular-vector signs used")
    core_up = (s.U.T @ up) * d[:, None]  # [k, r]
    core_down = (down @ s.V) * d[None, :]  # [r, k]
    new_up = t.U @ core_up
    new_down = core_down @ t.V.T
    if source.shape != target.shape:
        notes.append(f"shape {source.shape} -> {target.shape}")
    return finish("align", up, down, new_up, new_down, rank, source, target, notes)
