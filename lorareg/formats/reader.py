"""Read tensors named in one key format into canonical modules of one family.

Generic over formats and families: the format says how a key splits into prefix, module name and
factor suffix; the family's tables say which canonical module (or fused group) a name denotes.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from ..core.errors import InputError
from ..core.io import LazyTensor
from ..core.lora import REQUIRED_ROLES, FormatState, Lora, Module
from ..registry import Family, Variant
from ..registry.naming import FusedModule, flatten

LORA_ADAPTER_METADATA = "lora_adapter_metadata"


@dataclass
class ParsedKey:
    key: str
    component: str
    scheme: str
    target: object  # canonical module name (str) or FusedModule
    kind: str
    role: str
    spelling: int
    prefix: str
    doubled_prefix: bool = False
    bare: bool = False  # named without the component's module prefix (e.g. CLIP without text_model.)

    @property
    def target_name(self) -> str:
        return self.target.name if isinstance(self.target, FusedModule) else self.target


@dataclass
class ParseResult:
    variant: Variant
    family: Family
    parsed: dict[str, ParsedKey] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)  # key -> reason
    shape_mismatches: dict[str, str] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)

    @property
    def mapped_fraction(self) -> float:
        total = len(self.parsed) + len(self.unmapped)
        return len(self.parsed) / total if total else 0.0


@dataclass(frozen=True)
class SplitKey:
    """A key taken apart by one variant's spelling alone: suffix, then each prefix that fits."""

    key: str
    suffix: object  # formats.Suffix
    candidates: tuple  # ((PrefixRule, module string, doubled), ...) longest prefix first
    base: str  # the key without its suffix: keys sharing it (a module's factors and alpha) parse alike


class SplitKeys(list):
    """:func:`split_keys`' answer: one entry per key (a SplitKey, or (key, reason)), and ``rests``: per prefix
    rule (:func:`rule_key`), every module string it leaves of some key. A family none of whose name tables holds
    one of them parses none of the keys."""

    rests: dict[tuple, set[str]]


def rule_key(rule) -> tuple:
    """A prefix rule's identity for lookups: two rules with the same prefix and components read alike."""
    return rule.prefix, tuple(rule.components)


def split_keys(variant: Variant, keys) -> SplitKeys:
    """Family-independent part of parsing (done once per variant); a str entry is a reason."""
    out = SplitKeys()
    prefixes: dict[str, tuple] = {}  # base -> its prefix candidates (a module's keys share one base)
    for key in keys:
        suffix = variant.match_suffix(key)
        if suffix is None:
            out.append((key, "unknown factor suffix for this format"))
            continue
        base = key[: -len(suffix.text)]
        cands = prefixes.get(base)
        if cands is None:
            cands = prefixes[base] = _prefix_candidates(variant, base)
        out.append(SplitKey(key, suffix, cands, base) if cands else (key, "unknown key prefix for this format"))
    out.rests = {}
    for cands in prefixes.values():
        for rule, rest, _ in cands:
            out.rests.setdefault(rule_key(rule), set()).add(rest)
    return out


def _prefix_candidates(variant: Variant, base: str) -> tuple:
    cands = []
    for rule in variant.read_prefixes:
        if not base.startswith(rule.prefix):
            continue
        rest = base[len(rule.prefix) :]
        doubled = False
        while rule.prefix and rest.startswith(rule.prefix):
            rest, doubled = rest[len(rule.prefix) :], True
        if variant.spec.separator == "." and variant.name_rules:
            segs = rest.split(".")
            for r in variant.name_rules:
                segs = r.apply(segs)
            rest = ".".join(segs)
        cands.append((rule, rest, doubled))
    return tuple(cands)


def _rule_tables(variant: Variant, family: Family) -> dict[tuple, list[tuple]]:
    """Per prefix rule (:func:`rule_key`), the (component, scheme, name table, component) to look names up in, in order."""
    flat = variant.spec.separator == "_"
    return {
        rule_key(rule): [
            (cid, scheme, comp.flat_names(scheme) if flat else comp.scheme_names(scheme), comp)
            for cid in rule.components
            if (comp := family.components.get(cid)) is not None
            for scheme in variant.spec.schemes
            if comp.has_scheme(scheme)
        ]
        for rule in variant.read_prefixes
    }


def may_parse(variant: Variant, family: Family, split: SplitKeys) -> bool:
    """False when no key of ``split`` can parse as a module of ``family`` (no name table holds any of them)."""
    return any(not table.keys().isdisjoint(split.rests.get(rk, ())) for rk, entries in _rule_tables(variant, family).items()
               for _, _, table, _ in entries)


def parse_keys(variant: Variant, family: Family, tensors: Mapping[str, LazyTensor], split: Optional[list] = None) -> ParseResult:
    result = ParseResult(variant, family)
    doubled = False
    tables = _rule_tables(variant, family)
    if split is None:
        split = split_keys(variant, tensors)
    # per rule, the module strings some table names: any other misses at once (most keys, for a wrong family)
    known = {rk: set().union(*(table.keys() & rests for _, _, table, _ in tables.get(rk, ())))
             for rk, rests in split.rests.items()} if isinstance(split, SplitKeys) else None
    found: dict[str, Optional[tuple]] = {}  # base -> where it resolves: looked up once per module, not per key
    parsed, unmapped = result.parsed, result.unmapped
    missing = f"no module of family {family.id} has this name"
    for item in split:
        if isinstance(item, tuple):
            unmapped[item[0]] = item[1]
            continue
        hit = found.get(item.base, False)
        if hit is False:
            hit = found[item.base] = _lookup(item.candidates, variant, tables, known)
        if hit is None:
            unmapped[item.key] = missing
        else:
            s = item.suffix
            parsed[item.key] = ParsedKey(item.key, hit[0], hit[1], hit[2], s.kind, s.role, s.spelling, hit[3], hit[4], hit[5])
            doubled |= hit[4]
    _check_shapes(result, tensors)
    if doubled:
        result.evidence.append("doubled component prefix (e.g. transformer.transformer.) stripped")
    return result


def _lookup(candidates: tuple, variant: Variant, tables: dict[tuple, list[tuple]], known: Optional[dict[tuple, set[str]]]) -> Optional[tuple]:
    """(component, scheme, target, prefix, doubled, bare) of the first prefix candidate a table names
    (``known``: per rule, the module strings some table names; None: not known)."""
    for rule, rest, doubled in candidates:
        rk = rule_key(rule)
        if known is not None and rest not in known.get(rk, ()):
            continue
        for cid, scheme, table, comp in tables.get(rk, ()):
            target = table.get(rest)
            if target is not None:
                mp = comp.spec.module_prefix
                bare = bool(mp) and isinstance(target, str) and target.startswith(mp) and not rest.startswith(
                    mp if variant.spec.separator == "." else flatten(mp)
                )
                return cid, scheme, target, rule.prefix, doubled, bare
    return None


def _in_features(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _check_shapes(result: ParseResult, tensors: Mapping[str, LazyTensor]) -> None:
    """LoRA factors must fit the module: down's input size and up's output size."""
    fam = result.family
    for key, pk in list(result.parsed.items()):
        t = tensors[key]
        comp = fam.components[pk.component]
        if isinstance(pk.target, FusedModule):
            out = pk.target.out_features
            first = pk.target.slices[0].module
            inn = _in_features(comp.modules[first])
            kshape = comp.modules[first][2:]
        else:
            wshape = comp.modules[pk.target]
            out, inn, kshape = wshape[0], _in_features(wshape), wshape[2:]
        bad = None
        if pk.kind == "lora":
            if pk.role == "down" and _in_features(t.shape) != inn and not (
                len(t.shape) == 4 and t.shape[1] * math.prod(kshape or (1,)) == inn
            ):
                bad = f"input size {_in_features(t.shape)} != {inn}"
            elif pk.role == "up" and (len(t.shape) < 2 or t.shape[0] != out):
                bad = f"output size {t.shape[0] if t.shape else '?'} != {out}"
        elif pk.kind == "dora_scale":
            if out not in t.shape and inn not in t.shape:
                bad = f"magnitude shape {list(t.shape)} fits neither {out} nor {inn}"
        elif pk.kind == "svdiff":  # one shift per singular value of the (flattened) weight
            if len(t.shape) != 1 or t.shape[0] != min(out, inn):
                bad = f"spectral shift shape {list(t.shape)} != [min(out, in)] = [{min(out, inn)}]"
        elif pk.kind == "full" and pk.role == "diff":
            if t.shape[0] != out:
                bad = f"output size {t.shape[0]} != {out}"
        if bad:
            _reject(result, [key], f"shape does not fit {fam.id} {pk.component}:{pk.target_name} ({bad})")
    _check_lycoris_shapes(result, tensors)


def _reject(result: ParseResult, keys, reason: str) -> None:
    for key in keys:
        result.parsed.pop(key, None)
        result.unmapped[key] = reason
        result.shape_mismatches[key] = reason


def _check_lycoris_shapes(result: ParseResult, tensors: Mapping[str, LazyTensor]) -> None:
    """LoHa/LoKr factors fit a module only together: rebuild the output and input sizes they imply."""
    groups: dict[tuple[str, str], dict[str, tuple[int, ...]]] = defaultdict(dict)
    keys: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key, pk in result.parsed.items():
        if pk.kind in ("loha", "lokr") and not isinstance(pk.target, FusedModule):
            groups[(pk.component, pk.target)][pk.role] = tuple(tensors[key].shape)
            keys[(pk.component, pk.target)].append(key)
    for (cid, name), f in groups.items():
        wshape = result.family.components[cid].modules[name]
        out, inn = wshape[0], _in_features(wshape)
        try:
            got = _loha_dims(f, wshape) if "hada_w1_a" in f else _lokr_dims(f, wshape)
        except (KeyError, IndexError):
            continue  # incomplete: assemble() reports it
        if got != (out, inn):
            _reject(result, keys[(cid, name)], f"shape does not fit {result.family.id} {cid}:{name} (factors give {got}, module is {(out, inn)})")


def _loha_dims(f, wshape) -> tuple[int, int]:
    a, b = f["hada_w1_a"], f["hada_w1_b"]
    if "hada_t1" in f:  # a: [r, out], b: [r, in], t: [r, r, kh, kw]
        return a[1], b[1] * math.prod(f["hada_t1"][2:])
    return a[0], b[1]


def _lokr_dims(f, wshape) -> tuple[int, int]:
    if "lokr_w1" in f:
        a, c = f["lokr_w1"][0], f["lokr_w1"][1]
    else:
        a, c = f["lokr_w1_a"][0], f["lokr_w1_b"][1]
    if "lokr_w2" in f:
        b, dk = f["lokr_w2"][0], math.prod(f["lokr_w2"][1:])
    elif "lokr_t2" in f:  # a: [r, b], b: [r, d], t: [r, r, kh, kw]
        b, dk = f["lokr_w2_a"][1], f["lokr_w2_b"][1] * math.prod(f["lokr_t2"][2:])
    else:
        b, dk = f["lokr_w2_a"][0], f["lokr_w2_b"][1]
    return a * b, c * dk


# ---------------------------------------------------------------------------------------------
# assembling modules


@dataclass
class _Group:
    component: str
    target: object
    scheme: str
    kind: Optional[str] = None
    factors: dict = field(default_factory=dict)
    alpha: Optional[LazyTensor] = None
    dora: Optional[LazyTensor] = None
    keys: list = field(default_factory=list)
    mixed_kinds: bool = False


def assemble(
    result: ParseResult,
    tensors: Mapping[str, LazyTensor],
    metadata: Mapping[str, str],
    peft_config: Optional[dict] = None,
) -> Lora:
    """Turn parsed keys into canonical modules; split fused groups; resolve alpha."""
    variant, family = result.variant, result.family
    groups: dict[tuple[str, str], _Group] = {}
    state = FormatState(format=variant.format.id, variant=variant.id)
    unmapped = dict(result.unmapped)
    spellings: dict[str, Counter] = defaultdict(Counter)
    per_module_spelling: dict[str, int] = {}
    bare: set[str] = set()
    for key, pk in result.parsed.items():
        if pk.bare:
            bare.add(pk.component)
        g = groups.setdefault((pk.component, pk.target_name), _Group(pk.component, pk.target, pk.scheme))
        g.keys.append(key)
        state.schemes.setdefault(pk.component, pk.scheme)
        state.prefixes.setdefault(pk.component, pk.prefix)
        if pk.kind == "alpha":
            g.alpha = tensors[key]
            if state.alpha_dtype is None:
                state.alpha_dtype = tensors[key].dtype
        elif pk.kind == "dora_scale":
            g.dora = tensors[key]
        else:
            if g.kind is not None and g.kind != pk.kind:
                g.mixed_kinds = True
            g.kind = g.kind or pk.kind
            g.factors[pk.role] = tensors[key]
        if pk.kind != "alpha":
            spellings[f"{pk.component}/{pk.kind}/{pk.role}"][pk.spelling] += 1
            per_module_spelling[f"{pk.component}:{pk.target_name}/{pk.kind}/{pk.role}"] = pk.spelling
    for role_key, counts in spellings.items():
        state.spellings[role_key] = counts.most_common(1)[0][0]
    # modules spelled unlike their component's majority keep their own spelling on a round trip
    overrides = {}
    for mod_key, idx in per_module_spelling.items():
        cid = mod_key.split(":", 1)[0]
        role_key = cid + "/" + mod_key.split("/", 1)[1]
        if state.spellings.get(role_key) != idx:
            overrides[mod_key] = idx
    if overrides:
        state.extra["spelling_overrides"] = overrides
    if bare:
        state.extra["bare_names"] = sorted(bare)

    alphas = _alpha_source(variant, metadata, peft_config, state)
    modules: dict[str, Module] = {}
    for (cid, name), g in groups.items():
        missing = _missing_roles(g)
        if g.mixed_kinds or missing:
            why = "factors of different adapter types on one module" if g.mixed_kinds else f"incomplete module: missing {missing}"
            for k in g.keys:
                unmapped[k] = why
            continue
        alpha = _alpha_value(g, alphas, variant, cid)
        comp = family.components[cid]
        if isinstance(g.target, FusedModule):
            for m in _split_fused(g, g.target, alpha, comp.modules):
                modules[m.key] = m
        else:
            m = Module(cid, g.target, g.kind, dict(g.factors), alpha, g.dora, comp.modules[g.target], list(g.keys))
            modules[m.key] = m
    return Lora(family=family.id, modules=modules, metadata=dict(metadata), format_state=state, unmapped=unmapped)


def _missing_roles(g: _Group) -> list[str]:
    if g.kind is None:
        return ["factors"]
    return ["/".join(alts) for alts in REQUIRED_ROLES[g.kind] if not any(a in g.factors for a in alts)]


@dataclass
class _AlphaSource:
    """Where alpha comes from when the file has no alpha tensor for a module."""

    per_component: dict[str, dict] = field(default_factory=dict)  # component -> LoraConfig-like dict
    rslora: bool = False


def _alpha_source(variant: Variant, metadata: Mapping[str, str], peft_config: Optional[dict], state: FormatState) -> _AlphaSource:
    src = _AlphaSource()
    store = variant.spec.alpha.store
    if store == "metadata" and LORA_ADAPTER_METADATA in metadata:
        try:
            packed = json.loads(metadata[LORA_ADAPTER_METADATA])
        except json.JSONDecodeError:
            packed = {}
        if isinstance(packed, dict):
            for k, v in packed.items():
                comp, _, field_name = k.partition(".")
                if field_name:
                    src.per_component.setdefault(comp, {})[field_name] = v
    elif store == "config" and peft_config:
        src.per_component["*"] = peft_config
        src.rslora = bool(peft_config.get("use_rslora"))
        state.extra["peft_config"] = peft_config
    return src


def _pattern_lookup(patterns: Mapping[str, object], name: str):
    """PEFT's rank/alpha pattern semantics: the key matches the module path or a dotted suffix of it."""
    import re

    for pat, value in patterns.items():
        if name == pat or name.endswith("." + pat):
            return value
        try:
            if re.fullmatch(rf"(.*\.)?(?:{pat})", name):
                return value
        except re.error:
            continue  # a malformed pattern from the file matches nothing
    return None


def _alpha_value(g: _Group, src: _AlphaSource, variant: Variant, component: str) -> Optional[float]:
    if g.alpha is not None:
        if g.alpha.numel != 1:
            return None
        value = _scalar(g.alpha)
        return value if math.isfinite(value) else None
    cfg = src.per_component.get(component) or src.per_component.get("*")
    if cfg is None:
        return None
    name = g.target.name if isinstance(g.target, FusedModule) else g.target
    rank = g.factors["down"].shape[0] if "down" in g.factors else None
    alpha = _pattern_lookup(cfg.get("alpha_pattern") or {}, name)
    if alpha is None:
        alpha = cfg.get("lora_alpha")
    if alpha is None:
        return None
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        return None  # malformed metadata: fall back to scale 1
    if src.rslora and rank:
        # canonical scale is alpha / rank; rsLoRA's is lora_alpha / sqrt(rank)
        alpha = alpha * math.sqrt(rank)
    return alpha


#: one stored scalar's value, exactly as torch reads it (little-endian; bfloat16 is float32's top half)
_STRUCT = {"F16": "<e", "F32": "<f", "F64": "<d"}


def _scalar(t: LazyTensor) -> float:
    """A one-element tensor's value as a float, read from its bytes (a torch tensor per alpha costs more)."""
    if t.dtype in _STRUCT:
        return struct.unpack(_STRUCT[t.dtype], t.buffer())[0]
    if t.dtype == "BF16":
        return struct.unpack("<f", b"\x00\x00" + bytes(t.buffer()))[0]
    return float(t.torch().float().reshape(-1)[0])


def _split_fused(g: _Group, fused: FusedModule, alpha: Optional[float], shapes) -> list[Module]:
    """One original fused module -> its canonical parts. Exact: A is shared, B is sliced by rows."""
    if g.kind != "lora":
        raise InputError(f"{fused.name}: splitting a fused {g.kind} module is not supported")
    down, up = g.factors["down"], g.factors["up"].torch()
    rank = up.shape[1]
    per_module: dict[str, list] = defaultdict(list)
    for s in fused.slices:
        per_module[s.module].append(s)
    out = []
    for name, slices in per_module.items():
        rows = torch.zeros((shapes[name][0], *up.shape[1:]), dtype=up.dtype)
        for s in slices:
            rows[s.start : s.stop] = up[s.at : s.at + (s.stop - s.start)]
        factors = {"down": down, "up": LazyTensor.from_torch(rows)}
        part_alpha = alpha
        # A block-diagonal up (parts stacked at rank 3r) gives each part its own columns: recover rank r.
        used = (rows.reshape(rows.shape[0], rank, -1) != 0).any(dim=2).any(dim=0)
        if bool(used.any()) and not bool(used.all()):
            cols = used.nonzero().flatten()
            factors = {"down": LazyTensor.from_torch(down.torch()[cols].contiguous()), "up": LazyTensor.from_torch(rows[:, cols].contiguous())}
            part_alpha = None if alpha is None else alpha * len(cols) / rank
        if "mid" in g.factors:
            factors["mid"] = g.factors["mid"]
        out.append(Module(g.component, name, "lora", factors, part_alpha, None, shapes[name], list(g.keys)))
    return out
