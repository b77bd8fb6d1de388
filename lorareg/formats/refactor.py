"""Conversion between formats: read, make modules expressible in the target, write.

Plain LoRA modules pass through untouched (the same bytes). A Tucker LoCon (lora_mid) folds its core
into the down factor, exactly, when the target has no lora_mid. LoHa, LoKr and full diffs become
plain LoRA only with an explicit rank, and the relative error of each module is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from pydantic import BaseModel, Field

from ..core.errors import ConversionError
from ..engine.lowrank import recompress, relative_error
from ..core.io import LazyTensor
from ..core.lora import Lora, Module
from ..registry import Variant


class Refactored(BaseModel):
    module: str
    from_type: str
    to_type: str
    rank: int
    relative_error: float


class DroppedItem(BaseModel):
    item: str
    reason: str


class ConversionReport(BaseModel):
    source_format: str
    target_format: str
    family: str
    modules_in: int
    modules_out: int
    tensors_in: int
    tensors_out: int
    refactored: list[Refactored] = Field(default_factory=list)
    dropped: list[DroppedItem] = Field(default_factory=list)


@dataclass
class Plan:
    modules: dict[str, Module] = field(default_factory=dict)
    refactored: list[Refactored] = field(default_factory=list)


def _rel_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    denom = float(ref.norm())
    return float((ref - approx).norm()) / denom if denom > 0 else float((approx).norm())


def fold_tucker(m: Module) -> Module:
    """up · mid · down  ->  up · down' with down'[a,i,h,w] = Σ_b mid[a,b,h,w] down[b,i]. Same rank."""
    f = m.factors
    mid, down = f["mid"].float(), f["down"].float().flatten(1)
    folded = torch.einsum("abhw,bi->aihw", mid, down)
    new = replace(m, factors={"down": LazyTensor.from_torch(folded.to(f["down"].torch().dtype)), "up": f["up"]})
    return new


def _factored(m: Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """ΔW (scale included) as up @ down without the dense matrix, where the type allows it.

    LoHa: (a1 b1) ⊙ (a2 b2) = Σ_ij (a1[:,i] ⊙ a2[:,j]) (b1[i,:] ⊙ b2[j,:]), rank ≤ r².
    """
    f = m.factors
    if m.kind == "loha" and "hada_t1" not in f:
        a1, b1, a2, b2 = (f[k].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        up = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
        down = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
        return up * m.scale, down
    return None


def to_plain_lora(m: Module, rank: int) -> tuple[Module, float]:
    """Best rank-``rank`` plain LoRA of any module (truncated SVD of its ΔW); scale folded in."""
    shape = tuple(m.weight_shape) if m.weight_shape else tuple(m.delta_weight().shape)
    factored = _factored(m)
    if factored is not None:
        full_up, full_down = factored
        up, down = recompress(full_up, full_down, rank)
        err = relative_error(up, down, full_up, full_down)
        r = up.shape[1]
    else:
        mat = m.delta_weight().reshape(shape[0], -1)
        U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
        r = min(rank, S.numel())
        root = S[:r].sqrt()
        up = U[:, :r] * root
        down = root[:, None] * Vh[:r]
        err = _rel_error(mat, up @ down)
    dtype = m.factors[next(iter(m.factors))].torch().dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        dtype = torch.float32
    if len(shape) == 4:
        down = down.reshape(r, shape[1], shape[2], shape[3])
        up = up.reshape(shape[0], r, 1, 1)
    new = Module(
        m.component,
        m.name,
        "lora",
        {"down": LazyTensor.from_torch(down.to(dtype).contiguous()), "up": LazyTensor.from_torch(up.to(dtype).contiguous())},
        float(r),  # alpha = rank: the scale is already inside the factors
        m.dora_scale,
        m.weight_shape,
        list(m.source_keys),
    )
    return new, err


def plan_for(lora: Lora, variant: Variant, rank: Optional[int]) -> Plan:
    plan = Plan()
    blocked: list[Module] = []
    for key, m in lora.modules.items():
        if m.kind == "lora" and "mid" in m.factors and not variant.supports("lora", "mid"):
            new = fold_tucker(m)
            err = _rel_error(m.delta_weight(), new.delta_weight())
            plan.refactored.append(Refactored(module=key, from_type="locon-tucker", to_type="locon", rank=m.rank, relative_error=err))
            plan.modules[key] = new
        elif all(variant.supports(m.kind, role) for role in m.factors):
            plan.modules[key] = m
        elif rank is None:
            blocked.append(m)
        else:
            new, err = to_plain_lora(m, rank)
            plan.refactored.append(Refactored(module=key, from_type=m.type_name, to_type=new.type_name, rank=new.rank, relative_error=err))
            plan.modules[key] = new
    if blocked:
        kinds = sorted({m.type_name for m in blocked})
        raise ConversionError(
            f"{len(blocked)} modules are {'/'.join(kinds)}, which {variant.qualified_id} cannot express; "
            "pass --rank R to refactor them to plain LoRA (lossy; the error of each module is reported)"
        )
    return plan


def check_target(variant: Variant) -> None:
    if variant.spec.read_only or not variant.format.spec.writable:
        raise ConversionError(f"format {variant.format.id} is read-only")
