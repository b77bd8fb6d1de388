"""Refactorings that need the base weight: DoRA -> plain LoRA, SVDiff -> plain LoRA.

A DoRA module's effect is W' − W = s ⊙ (W + ΔW) − W (s = m / ‖W + ΔW‖ per unit), and an SVDiff
module's is U diag(ReLU(σ + δ)) Vᵀ − W: both need W, and both are in general of full rank, so the
plain LoRA is their truncated SVD at the rank asked for, with the relative error reported.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.errors import ConversionError
from ..core.lora import Module
from ..engine.dora import OUT, PEFT_SUFFIX, magnitude_axis, merged_weight
from ..engine.svdiff import shifted_weight


def _peft_layout(m: Module) -> bool:
    return any(k.endswith(PEFT_SUFFIX) for k in m.source_keys)


def dora_axis(m: Module) -> int:
    return magnitude_axis(m.dora_scale.shape, m.weight_shape, _peft_layout(m))


def can_store_magnitude(variant, m: Module) -> bool:
    """The format has a magnitude key, and its layout can say the module's axis (PEFT: outputs only)."""
    if not variant.spec.dora_scale:
        return False
    peft_only = all(s.endswith(PEFT_SUFFIX) for s in variant.spec.dora_scale)
    return not peft_only or dora_axis(m) == OUT


def dora_delta(m: Module, weight: torch.Tensor) -> torch.Tensor:
    """W' − W of a DoRA module (dense, float64, the weight's shape)."""
    w = weight.reshape(m.weight_shape)
    return merged_weight(w, m.delta_weight().reshape(w.shape), m.dora_scale.float(), dora_axis(m)) - w.double()


def svdiff_delta(m: Module, weight: torch.Tensor, basis: Optional[tuple] = None) -> torch.Tensor:
    """W' − W of an SVDiff module: the full SVD of W (``basis``: (U, S, Vh) already computed)."""
    return shifted_weight(weight, m.factors["delta"].float(), basis) - weight.double()


def needs_base_message(n: int, what: str, target: str) -> str:
    return (f"{n} modules are {what}, which {target} cannot store: pass --model BASE (the base model) and --rank R "
            "to refactor them to plain LoRA (W' − W truncated to rank R; the error of each module is reported)")


def check_base(base, rank: Optional[int], n: int, what: str, target: str) -> None:
    if base is None or rank is None:
        extra = ", or --drop-dora to drop the magnitudes (listed as dropped)" if what == "DoRA" else ""
        raise ConversionError(needs_base_message(n, what, target) + extra)
