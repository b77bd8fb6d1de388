"""Mixture-of-experts families (Wan 2.2 A14B): which expert a file holds, and one file per expert.

The family file says which component denoises the high-noise range and which the low-noise one
(``experts``). diffusers-style keys name both (``transformer.`` / ``transformer_2.``); the original-name
formats that ComfyUI and musubi load (``diffusion_model.``, ``lora_unet_``) hold one expert per file, so
such a file is read into the first component and the expert it belongs to comes from ``--expert``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..core.errors import InputError
from ..core.lora import Lora, Module
from ..registry import Family, Variant, get_registry

#: --expert values -> the experts' names in family files
CHOICES = {"high": "high_noise", "low": "low_noise"}


def which(choice: str) -> str:
    if choice not in CHOICES:
        raise InputError(f"--expert must be one of {', '.join(CHOICES)} (got {choice!r})")
    return CHOICES[choice]


def _variant_of(lora: Lora, fmt_id: Optional[str], family: Family) -> Optional[Variant]:
    """The variant a save of ``lora`` in ``fmt_id`` would use (the file's own, else the family's default)."""
    registry = get_registry()
    fmt_id = fmt_id or (lora.format_state.format if lora.format_state else None)
    if fmt_id is None:
        return None
    fmt = registry.format(fmt_id)
    st = lora.format_state
    if st and st.format == fmt.id:
        v = fmt.variant(st.variant)
        if not v.spec.read_only:
            return v
    return fmt.write_variant_for(family)


def names_experts(variant: Optional[Variant], family: Family) -> bool:
    """Does this key format spell both experts apart (diffusers' transformer_2.)?"""
    ex = family.spec.experts
    return bool(ex and variant and variant.write_prefix(ex.low_noise, set(family.components)) is not None)


def assign(lora: Lora, family: Family, choice: str) -> Lora:
    """A single-expert file's modules moved to the expert ``choice`` names (read into the high-noise component)."""
    ex = family.spec.experts
    if ex is None:
        raise InputError(f"--expert applies to families with two experts (Wan 2.2 A14B); {family.id} has one denoiser")
    comps = {m.component for m in lora.modules.values()}
    if comps - {ex.high_noise}:
        raise InputError(f"--expert {choice}: the file already names its experts ({', '.join(sorted(comps))})")
    dest = ex.component(which(choice))
    modules = {}
    for m in lora.modules.values():
        moved = replace(m, component=dest)
        modules[moved.key] = moved
    return replace(lora, modules=modules)


def from_metadata(lora: Lora) -> Optional[str]:
    """The --expert choice a file's own metadata gives (lorareg writes lorareg.expert into single-expert files)."""
    value = lora.metadata.get("lorareg.expert")
    return next((c for c, w in CHOICES.items() if w == value), None)


def require_known(lora: Lora, family: Family) -> None:
    """Refuse a single-expert file whose expert its keys do not say (never guessed)."""
    ex = family.spec.experts
    if ex is None or not lora.modules:
        return
    comps = {m.component for m in lora.modules.values()}
    variant = _variant_of(lora, None, family)
    if comps == {ex.high_noise} and not names_experts(variant, family):
        raise InputError(f"{family.id} has two experts and this {variant.qualified_id if variant else ''} file holds one "
                         "without saying which: pass --expert high or --expert low")


def split_paths(output: Path, family: Family) -> dict[str, Path]:
    ex = family.spec.experts
    assert ex is not None
    return {w: output.with_name(output.stem + ex.suffix(w) + output.suffix) for w in ("high_noise", "low_noise")}


def split(lora: Lora, family: Family, fmt_id: Optional[str]) -> Optional[dict[str, Lora]]:
    """One LoRA per expert when the output format cannot name both in one file (ComfyUI, musubi); else None.

    Each part holds its expert's modules under the high-noise component, where single-expert files keep them.
    """
    ex = family.spec.experts
    if ex is None:
        return None
    if names_experts(_variant_of(lora, fmt_id, family), family):
        return None
    parts: dict[str, dict[str, Module]] = {}
    for w in ("high_noise", "low_noise"):
        comp = ex.component(w)
        mods = {}
        for m in lora.modules.values():
            if m.component == comp:
                moved = replace(m, component=ex.high_noise)
                mods[moved.key] = moved
        if mods:
            parts[w] = mods
    return {w: replace(lora, modules=mods) for w, mods in parts.items()}
