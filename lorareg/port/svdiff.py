"""`lorareg port` of SVDiff spectral shifts: ``--method spectral`` (the same shifts on the target's own
spectrum) or, with any other method, their LoRA form (W' − W from the source weight's SVD, truncated
to --rank) ported like any LoRA. The math is lorareg.engine.svdiff."""

from __future__ import annotations

from typing import Optional

from ..core.errors import InputError
from ..core.lora import Lora, Module
from ..formats.base_refactor import svdiff_delta
from ..formats.refactor import to_plain_lora

SPECTRAL = "spectral"


def check_svdiff(method: str, lora: Lora, with_models: bool, rank: Optional[int]) -> int:
    n = sum(1 for m in lora.modules.values() if m.kind == "svdiff")
    if n and method != SPECTRAL and (not with_models or rank is None):
        raise InputError(
            f"{n} modules are SVDiff spectral shifts: port them with --method spectral (the same shifts on the target's "
            "spectrum), or give --source-model, --target-model and --rank R to port their LoRA form (W' − W of the source)"
        )
    return n


def spectral_step(m: Module, pair, method: str, rep, src_w, rank: Optional[int]) -> Optional[Module]:
    """The module to write (SVDiff), the plain LoRA to project, or None (``rep.skipped`` says why)."""
    if method == SPECTRAL:
        if m.kind != "svdiff":
            rep.skipped = f"--method spectral ports SVDiff shifts only (this is a {m.type_name} module)"
            return None
        tshape = list(pair.target_shape)
        singular = min(tshape[0], _numel(tshape[1:]))
        if singular != m.factors["delta"].shape[0]:
            rep.skipped = f"{m.factors['delta'].shape[0]} spectral shifts, the target weight has {singular} singular values"
            return None
        return Module(pair.target_component, pair.target_module, "svdiff", dict(m.factors), None, None, tuple(tshape), [])
    lora, _ = to_plain_lora(m, rank, delta=svdiff_delta(m, src_w.weight(pair.source_component, pair.source_module)))
    return lora


def check_output(modules, fmt: str, target_model: Optional[str], rank: Optional[int]) -> None:
    if fmt != "svdiff" and any(m.kind == "svdiff" for m in modules.values()) and (target_model is None or rank is None):
        raise InputError(f"SVDiff shifts written as {fmt} need --target-model (the shifts act on its spectrum) and --rank R "
                         "(W' − W truncated to that rank); or write them with --format svdiff")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
