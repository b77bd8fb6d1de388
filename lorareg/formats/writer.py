"""Write canonical modules as the keys of one format (the inverse of reader.py)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.errors import ConversionError
from ..core.io import DTYPES, LazyTensor
from ..core.lora import FormatState, Lora, Module
from .reader import LORA_ADAPTER_METADATA
from ..registry import CANONICAL, Family, Variant
from ..registry.naming import FusedModule, flatten


@dataclass
class Dropped:
    item: str  # an input key or a canonical module
    reason: str


@dataclass
class Written:
    tensors: dict[str, LazyTensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    peft_config: Optional[dict] = None
    dropped: list[Dropped] = field(default_factory=list)


def _state_for(lora: Lora, variant: Variant) -> Optional[FormatState]:
    """The spelling to reproduce: from the file itself, or from the provenance of an earlier conversion."""
    for state in (lora.format_state, _origin_state(lora)):
        if state and state.format == variant.format.id and state.variant == variant.id:
            return state
    return None


def _origin_state(lora: Lora) -> Optional[FormatState]:
    raw = lora.metadata.get("lorareg.source_state")
    if not raw:
        return None
    try:
        return FormatState.model_validate_json(raw)
    except ValueError:
        return None


def _cast(t: torch.Tensor, dtype: str) -> LazyTensor:
    return LazyTensor.from_torch(t.to(DTYPES[dtype][0]).contiguous())


def write_modules(lora: Lora, variant: Variant, family: Family) -> Written:
    out = Written()
    state = _state_for(lora, variant)
    comps = set(family.components)
    fused_buckets: dict[tuple[str, str], tuple[FusedModule, list[Module]]] = {}
    alpha_store = variant.spec.alpha.store
    sep = variant.spec.separator

    bare = set(state.extra.get("bare_names", ())) if state else set()
    overrides = state.extra.get("spelling_overrides", {}) if state else {}

    def key_base(cid: str, name: str) -> Optional[str]:
        prefix = state.prefixes.get(cid) if state else None
        if prefix is None:
            prefix = variant.write_prefix(cid, comps)
        if prefix is None:
            return None
        mp = family.components[cid].spec.module_prefix
        if cid in bare and mp and name.startswith(mp):
            name = name[len(mp) :]
        return prefix + (flatten(name) if sep == "_" else name)

    def spelling(m: Module, kind: str, role: str) -> int:
        if not state:
            return 0
        own = overrides.get(f"{m.component}:{m.name}/{kind}/{role}")
        return own if own is not None else state.spellings.get(f"{m.component}/{kind}/{role}", 0)

    for m in lora.modules.values():
        comp = family.components.get(m.component)
        if comp is None:
            out.dropped.append(Dropped(m.key, f"family {family.id} has no component {m.component}"))
            continue
        scheme = _scheme_for(variant, comp, state)
        if scheme is None:
            out.dropped.append(Dropped(m.key, f"{variant.qualified_id} cannot name {family.id} {m.component} modules"))
            continue
        group = comp.fused_group_of(scheme).get(m.name) if scheme != CANONICAL else None
        if group is not None:
            fused_buckets.setdefault((m.component, group.name), (group, []))[1].append(m)
            continue
        base = key_base(m.component, comp.name_in(scheme, m.name))
        if base is None:
            out.dropped.append(Dropped(m.key, f"{variant.qualified_id} has no key prefix for component {m.component}"))
            continue
        _emit(out, variant, base, m, m.factors, m.alpha, m.rank, spelling, state)

    for (cid, _), (group, members) in fused_buckets.items():
        base = key_base(cid, group.name)
        if base is None:
            out.dropped.extend(Dropped(m.key, f"{variant.qualified_id} has no key prefix for {cid}") for m in members)
            continue
        factors, alpha, rank = _fuse(group, members)
        carrier = members[0]
        _emit(out, variant, base, carrier, factors, alpha, rank, spelling, state)

    if alpha_store == "metadata":
        meta = _diffusers_adapter_metadata(lora, variant, family)
        if meta:
            out.metadata[LORA_ADAPTER_METADATA] = json.dumps(meta, indent=2, sort_keys=True)
    elif alpha_store == "config":
        out.peft_config = _peft_config(lora, family, state)
    return out


def _scheme_for(variant: Variant, comp, state: Optional[FormatState]) -> Optional[str]:
    if state and comp.id in state.schemes and comp.has_scheme(state.schemes[comp.id]):
        return state.schemes[comp.id]
    for scheme in variant.spec.schemes:
        if comp.has_scheme(scheme):
            return scheme
    return None


def _emit(out: Written, variant: Variant, base: str, m: Module, factors, alpha, rank, spelling, state) -> None:
    kind = m.kind
    store = variant.spec.alpha.store
    if store == "baked" and alpha is not None and rank:
        s = math.sqrt(alpha / rank)
        if s != 1.0:
            factors = {k: _cast(v.float() * s, v.dtype) if k in ("down", "up") else v for k, v in factors.items()}
        alpha = None
    for role, t in factors.items():
        if not variant.supports(kind, role):
            raise ConversionError(f"{variant.qualified_id} cannot store {kind} factor {role!r} of {m.key}")
        key = base + variant.suffix_text(kind, role, spelling(m, kind, role))
        _put(out, key, t)
    if m.dora_scale is not None:
        if variant.spec.dora_scale:
            suffix = variant.suffix_text("dora_scale", "dora_scale", spelling(m, "dora_scale", "dora_scale"))
            _put(out, base + suffix, _dora_layout(m.dora_scale, suffix))
        else:
            out.dropped.append(Dropped(m.key + " (DoRA magnitude)", f"{variant.qualified_id} cannot store DoRA magnitudes"))
    if store == "tensor" and alpha is not None:
        dtype = (state.alpha_dtype if state and state.alpha_dtype else None) or "F32"
        _put(out, base + variant.spec.alpha.suffix, LazyTensor.from_torch(torch.tensor(alpha, dtype=DTYPES[dtype][0])))


def _put(out: Written, key: str, t: LazyTensor) -> None:
    if key in out.tensors:
        raise ConversionError(f"two modules would write the same key {key!r}")
    out.tensors[key] = t


def _dora_layout(t: LazyTensor, suffix: str) -> LazyTensor:
    """PEFT keeps the magnitude as a vector [out]; LyCORIS/kohya as a column [out, 1]."""
    vector = suffix.endswith("lora_magnitude_vector")
    if vector and len(t.shape) == 2 and t.shape[1] == 1:
        return LazyTensor.from_torch(t.torch().reshape(-1))
    if not vector and len(t.shape) == 1:
        return LazyTensor.from_torch(t.torch().reshape(-1, 1))
    return t


def _fuse(group: FusedModule, members: list[Module]):
    """Canonical parts -> one fused original module.

    Parts read from one fused module share their down factor: fusing them back is exact (bit for
    bit). Otherwise the down factors are stacked (rank = sum of ranks) and the up factor is block
    diagonal, with each part's scale folded into its rows: ΔW is preserved exactly.
    """
    by_name = {m.name: m for m in members}
    for m in members:
        if m.kind != "lora" or "mid" in m.factors:
            raise ConversionError(f"{m.key}: only plain LoRA modules can be fused into {group.name}")
    first = members[0]
    down0 = first.factors["down"]
    shared = len({m.name for m in members}) == len({s.module for s in group.slices}) and all(
        m.alpha == first.alpha
        and (m.factors["down"] is down0 or torch.equal(m.factors["down"].torch(), down0.torch()))
        for m in members
    )
    if shared:
        up_dtype = first.factors["up"].dtype
        up = torch.zeros((group.out_features, first.rank), dtype=DTYPES[up_dtype][0])
        for s in group.slices:
            up[s.at : s.at + s.stop - s.start] = by_name[s.module].factors["up"].torch()[s.start : s.stop]
        return {"down": down0, "up": LazyTensor.from_torch(up)}, first.alpha, first.rank
    col: dict[str, int] = {}
    total = 0
    for m in members:
        col[m.name] = total
        total += m.rank
    # equal scales (the usual case) keep the factors' bits; otherwise each part's scale goes into its rows
    same_scale = len({m.scale for m in members}) == 1 and len({m.alpha is None for m in members}) == 1
    dtype = first.factors["up"].dtype
    down = torch.cat([m.factors["down"].torch().flatten(1) for m in members], dim=0)
    up = torch.zeros((group.out_features, total), dtype=DTYPES[dtype][0] if same_scale else torch.float32)
    for s in group.slices:
        m = by_name.get(s.module)
        if m is None:
            continue  # a part the LoRA does not adapt contributes zero rows
        c = col[m.name]
        rows = m.factors["up"].torch().flatten(1)[s.start : s.stop]
        up[s.at : s.at + s.stop - s.start, c : c + m.rank] = rows if same_scale else rows.float() * m.scale
    if same_scale:
        alpha = None if first.alpha is None else first.scale * total
        return {"down": LazyTensor.from_torch(down), "up": LazyTensor.from_torch(up)}, alpha, total
    down_dtype = first.factors["down"].dtype
    return {"down": _cast(down.float(), down_dtype), "up": _cast(up, dtype)}, float(total), total


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _lora_config_fields(mods: list[Module], module_prefix: str = "") -> dict:
    """LoraConfig fields. Names drop the component's module prefix: PEFT matches module names by
    suffix, so 'encoder.layers.0...' fits CLIP with or without its text_model level."""

    def short(name: str) -> str:
        return name[len(module_prefix) :] if module_prefix and name.startswith(module_prefix) else name

    ranks = {short(m.name): m.rank for m in mods}
    alphas = {short(m.name): (m.alpha if m.alpha is not None else float(m.rank)) for m in mods}
    r = _most_common(ranks.values())
    alpha = _most_common(alphas.values())
    return {
        "r": r,
        "lora_alpha": _num(alpha),
        "rank_pattern": {n: v for n, v in sorted(ranks.items()) if v != r},
        "alpha_pattern": {n: _num(v) for n, v in sorted(alphas.items()) if v != alpha},
        "target_modules": sorted(ranks),
        "use_dora": any(m.dora_scale is not None for m in mods),
    }


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _diffusers_adapter_metadata(lora: Lora, variant: Variant, family: Family) -> dict:
    """diffusers' lora_adapter_metadata: a LoraConfig per component, keys '<component>.<field>'."""
    if all(m.alpha is None for m in lora.modules.values()):
        return {}
    packed = {}
    for cid in sorted({m.component for m in lora.modules.values()}):
        mods = [m for m in lora.modules.values() if m.component == cid and m.kind == "lora"]
        if not mods:
            continue
        fields = _lora_config_fields(mods, family.components[cid].spec.module_prefix)
        fields.update({"lora_dropout": 0.0, "bias": "none", "init_lora_weights": True})
        for k, v in fields.items():
            packed[f"{cid}.{k}"] = v
    return packed


def _peft_config(lora: Lora, family: Family, state: Optional[FormatState]) -> dict:
    base = dict(state.extra.get("peft_config", {})) if state else {}
    mods = [m for m in lora.modules.values() if m.kind == "lora"]
    if not mods:
        raise ConversionError("a PEFT adapter needs at least one plain LoRA module")
    fields = _lora_config_fields(mods)
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if family.spec.kind == "text" else None,
        "base_model_name_or_path": family.spec.hub.default_repo,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "use_rslora": False,
    }
    cfg.update(base)
    cfg.update(fields)
    cfg["use_rslora"] = False  # canonical alpha already folds rsLoRA's sqrt(r)
    if base.get("use_rslora"):
        # keep the file's own convention: lora_alpha / sqrt(r)
        cfg["use_rslora"] = True
        cfg["lora_alpha"] = _num(_most_common([m.alpha / math.sqrt(m.rank) if m.alpha else math.sqrt(m.rank) for m in mods]))
        cfg["alpha_pattern"] = {
            m.name: _num(m.alpha / math.sqrt(m.rank))
            for m in mods
            if m.alpha is not None and _num(m.alpha / math.sqrt(m.rank)) != cfg["lora_alpha"]
        }
    return cfg
