"""`lorareg port` of DoRA magnitudes: the options, the per-layer step, the report lines.

The math is lorareg.engine.dora; this module reads the two base weights a layer needs and says
what happened to each magnitude, so that none is ever dropped without the report saying so.
"""

from __future__ import annotations

from collections import Counter
from typing import Optional


from ..core.errors import ConversionError, InputError
from ..core.io import LazyTensor
from ..core.lora import Lora, Module
from ..engine.dora import OUT, PEFT_SUFFIX, canonical, magnitude_axis, merged_norms, transfer_magnitude
from ..formats.base_refactor import can_store_magnitude
from ..registry import get_registry

DORA_MODES = ("transfer", "copy", "drop")


def check_dora(mode: str, lora: Lora, with_models: bool, refine: Optional[str]) -> int:
    """Number of DoRA modules; refuses a mode the inputs cannot honour."""
    if mode not in DORA_MODES:
        raise InputError(f"unknown --dora {mode!r} ({', '.join(DORA_MODES)})")
    n = sum(1 for m in lora.modules.values() if m.dora_scale is not None)
    if not n:
        return 0
    if refine is not None and mode != "drop":
        raise InputError(f"{n} modules are DoRA and --refine distill trains plain LoRA factors only; pass --dora drop to refine a plain LoRA")
    if mode == "transfer" and not with_models:
        raise InputError(
            f"{n} modules are DoRA: their magnitudes are ported against the base weights' norms, so pass --source-model "
            "and --target-model (or --dora drop to port a plain LoRA, which changes W' even on the same model)"
        )
    return n


def is_peft_layout(m: Module) -> bool:
    return any(k.endswith(PEFT_SUFFIX) for k in m.source_keys)


def same_magnitude(orig: Module) -> LazyTensor:
    """The source's magnitude, same values, in lorareg's unambiguous layout (the ported module has no
    source keys left to tell PEFT's [1, out, 1, 1] from LyCORIS's [1, in, 1, 1])."""
    t = orig.dora_scale
    axis = magnitude_axis(t.shape, orig.weight_shape, is_peft_layout(orig))
    return LazyTensor.from_torch(canonical(t.torch(), axis, len(orig.weight_shape), t.torch().dtype))


def port_magnitude(orig: Module, m: Module, new: Module, pair, mode: str, src_w, tgt_w) -> str:
    """Give ``new`` (the ported direction) its magnitude; return what was done.

    ``orig`` is the source module as read, ``m`` its plain-LoRA form that was projected.
    """
    mag = orig.dora_scale
    if mode == "drop":
        return "dropped"
    sshape, tshape = list(pair.source_shape), list(pair.target_shape)
    axis = magnitude_axis(mag.shape, sshape, is_peft_layout(orig))
    units = tshape[axis]
    if units != sshape[axis]:
        raise ConversionError(f"DoRA magnitude: {sshape[axis]} {'outputs' if axis == OUT else 'inputs'} on the source, {units} on the target")
    if mode == "copy":
        new.dora_scale = same_magnitude(orig)
        return "copied"
    w_s = src_w.weight(pair.source_component, pair.source_module)
    w_t = tgt_w.weight(pair.target_component, pair.target_module)
    if orig.kind == "lora":
        src_norms = merged_norms(w_s, m.factors["up"].float(), m.factors["down"].float(), m.scale, axis, sshape)
    else:  # LoHa/LoKr/full: the magnitude was learned against the exact ΔW, not its low-rank refactoring
        merged = w_s.double() + orig.delta_weight().reshape(w_s.shape).double()
        src_norms = merged_norms(merged, None, None, 1.0, axis, sshape)
    tgt_norms = merged_norms(w_t, new.factors["up"].float(), new.factors["down"].float(), new.scale, axis, tshape)
    values = transfer_magnitude(mag.float(), src_norms, tgt_norms)
    new.dora_scale = LazyTensor.from_torch(canonical(values, axis, len(tshape), mag.torch().dtype))
    return "transferred"


def dora_warnings(mode: str, layers) -> list[str]:
    counts = Counter(l.dora for l in layers if l.dora and not l.skipped)
    out = []
    if counts.get("dropped"):
        out.append(f"DoRA magnitude dropped on {counts['dropped']} layers (--dora drop): the output is a plain LoRA, "
                   "so W' differs from the source's even on the same model")
    if counts.get("copied"):
        out.append(f"DoRA magnitude copied as stored on {counts['copied']} layers (--dora copy): it was learned against the "
                   "source's norms and drags each unit of the target to the source's scale")
    return out


def dora_summary(report) -> list[str]:
    if not report.dora:
        return []
    counts = Counter(l.dora for l in report.layers if l.dora and not l.skipped)
    parts = [f"{n} {what}" for what, n in sorted(counts.items())]
    return [f"  DoRA magnitude ({report.dora}): " + (", ".join(parts) if parts else "no DoRA layer ported")]


def check_output_format(modules: dict, fmt_id: str) -> None:
    """Refuse a port whose output format has no place for its magnitudes (a silent drop otherwise)."""
    dora = [m for m in modules.values() if m.dora_scale is not None]
    if not dora:
        return
    variants = [v for v in get_registry().format(fmt_id).variants if not v.spec.read_only]
    bad = [m for m in dora if not any(can_store_magnitude(v, m) for v in variants)]
    if bad:
        raise InputError(f"{len(bad)} ported modules are DoRA and format {fmt_id} cannot store their magnitudes: write a format "
                         "that can (kohya keeps both layouts) or pass --dora drop (a plain LoRA, said in the summary and report)")

