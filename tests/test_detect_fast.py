"""Detection's fast paths give exactly the verdicts of the plain one.

The plain scoring below parses keys one at a time against every (variant, family) pair a strided sample of
keys leaves in, as detection did before it looked each module base up once. On files in every
writable format of every registered family (spread and complete module sets, LyCORIS factors, mixed,
broken and ambiguous files), the fast scoring must list the same candidates and parse the same keys; and a
verdict remembered by file fingerprint must be the one detection gives.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorareg.core.errors import ConversionError, InputError
from lorareg.core.io import open_tensors
from lorareg.formats.detect import SAMPLE_KEYS, Candidate, _family_groups, _group, _leaf, detect_file, detect_tensors, metadata_hints, score_candidates
from lorareg.formats.reader import ParsedKey, ParseResult, _check_shapes
from lorareg.registry import get_registry
from lorareg.registry.naming import flatten

from lora_factory import make_lora, write


# -- the plain scoring (reference) ----------------------------------------------------------------------

def _plain_split(variant, keys) -> dict:
    """key -> (suffix, prefix candidates) or a reason, key by key (family-independent, as detection splits)."""
    out = {}
    for key in keys:
        suffix = next((s for s in variant.suffixes if key.endswith(s.text) and len(key) > len(s.text)), None)
        if suffix is None:
            out[key] = "unknown factor suffix for this format"
            continue
        base = key[: -len(suffix.text)]
        cands = []
        for rule in variant.read_prefixes:
            if not base.startswith(rule.prefix):
                continue
            rest, doubled = base[len(rule.prefix):], False
            while rule.prefix and rest.startswith(rule.prefix):
                rest, doubled = rest[len(rule.prefix):], True
            if variant.spec.separator == "." and variant.name_rules:
                segs = rest.split(".")
                for r in variant.name_rules:
                    segs = r.apply(segs)
                rest = ".".join(segs)
            cands.append((rule, rest, doubled))
        out[key] = (suffix, cands) if cands else "unknown key prefix for this format"
    return out


def _plain_parse(variant, family, tensors, split) -> ParseResult:
    result = ParseResult(variant, family)
    flat = variant.spec.separator == "_"
    doubled_any = False
    for key in tensors:
        if isinstance(split[key], str):
            result.unmapped[key] = split[key]
            continue
        suffix, cands = split[key]
        pk = next((_parsed(key, suffix, rule, rest, doubled, cid, scheme, target, variant, family.components[cid])
                   for rule, rest, doubled in cands
                   for cid in rule.components if cid in family.components
                   for scheme in variant.spec.schemes if family.components[cid].has_scheme(scheme)
                   for target in [_table(family.components[cid], scheme, flat).get(rest)] if target is not None), None)
        if pk is None:
            result.unmapped[key] = f"no module of family {family.id} has this name"
        else:
            result.parsed[key] = pk
            doubled_any |= pk.doubled_prefix
    _check_shapes(result, tensors)
    if doubled_any:
        result.evidence.append("doubled component prefix (e.g. transformer.transformer.) stripped")
    return result


def _table(comp, scheme, flat):
    return comp.flat_names(scheme) if flat else comp.scheme_names(scheme)


def _parsed(key, suffix, rule, rest, doubled, cid, scheme, target, variant, comp) -> ParsedKey:
    mp = comp.spec.module_prefix
    bare = bool(mp) and isinstance(target, str) and target.startswith(mp) and not rest.startswith(
        mp if variant.spec.separator == "." else flatten(mp))
    return ParsedKey(key, cid, scheme, target, suffix.kind, suffix.role, suffix.spelling, rule.prefix, doubled, bare)


def _names(pk):
    return [s.module for s in pk.target.slices] if hasattr(pk.target, "slices") else [pk.target]


def _plain_coverage(res) -> float:
    touched, modules = {}, set()
    for pk in res.parsed.values():
        for n in _names(pk):
            modules.add((pk.component, n))
            touched.setdefault(pk.component, set()).add(_leaf(n))
    if not modules:
        return 0.0
    total = sum(sum(1 for n in res.family.components[cid].modules if _leaf(n) in leaves) for cid, leaves in touched.items())
    return len(modules) / total if total else 0.0


def _plain_groups(res) -> int:
    seen = {}
    for pk in res.parsed.values():
        for n in _names(pk):
            g, i = _group(n)
            if i is not None:
                seen.setdefault((pk.component, g), set()).add(i)
    fam = _family_groups(res.family)
    return sum(1 for key, idx in seen.items() if len(fam.get(key, ())) > 1 and idx == fam[key])


def plain_scores(tensors, metadata, registry, container="safetensors"):
    """As detection scored before: a (variant, family) pair none of a strided sample of keys parses as is
    left out, every other pair parses every key."""
    hints = metadata_hints(metadata, registry)
    out, results = [], {}
    keys = list(tensors)
    sample = {k: tensors[k] for k in keys[:: max(1, len(keys) // SAMPLE_KEYS)]}
    for fmt in registry.formats.values():
        if fmt.spec.container != container:
            continue
        for variant in fmt.variants:
            split = _plain_split(variant, keys)
            for fam in registry.families.values():
                if not variant.applies_to(fam) or not _plain_parse(variant, fam, sample, split).parsed:
                    continue
                res = _plain_parse(variant, fam, tensors, split)
                if not res.parsed:
                    continue
                results[(fmt.id, variant.id, fam.id)] = res
                out.append(Candidate(format=fmt.id, variant=variant.id, family=fam.id, mapped=len(res.parsed), total=len(tensors),
                                     coverage=round(_plain_coverage(res), 6), complete_groups=_plain_groups(res),
                                     rank_on_tie=fam.spec.detection.rank_on_tie, shape_mismatches=len(res.shape_mismatches),
                                     metadata_agrees=fam.id in hints))
    return out, results


# -- the files -------------------------------------------------------------------------------------------

def _spread(k: int):
    return lambda cid, name: zlib.crc32(f"{cid}:{name}".encode()) % k == 0


def _files(tmp: Path) -> list[tuple[Path, str]]:
    """(weights file, container) for every family x writable format that can hold it, and odd files."""
    reg = get_registry()
    out = []
    full = {"sdxl", "flux.1-dev", "wan2.1-t2v-1.3b"}  # every module: complete block groups
    every_format = {"sd15", "sdxl", "flux.1-dev", "chroma", "hunyuan-video", "wan2.1-t2v-14b", "wan2.2-i2v-a14b", "tinyllama"}
    for fam in reg.families:
        selections = [("spread", _spread(9))] + ([("all", lambda c, n: True)] if fam in full else [])
        for label, select in selections:
            lora = make_lora(fam, select, rank=1, conv=label == "spread")
            formats = ("kohya", "diffusers", "ldm", "musubi", "peft") if fam in every_format and label == "spread" else ("kohya", "diffusers")
            for fmt in formats:
                path = tmp / f"{fam}-{label}-{fmt}" if fmt == "peft" else tmp / f"{fam}-{label}-{fmt}.safetensors"
                try:
                    write(lora, path, fmt)
                except (ConversionError, InputError):
                    continue
                weights = path / "adapter_model.safetensors" if fmt == "peft" else path
                if not open_tensors(weights)[0]:
                    continue  # the format names none of the family's modules
                out.append((path / "adapter_model.safetensors" if fmt == "peft" else path,
                            "peft_dir" if fmt == "peft" else "safetensors"))
    sdxl = tmp / "sdxl-spread-kohya.safetensors"
    flux = tmp / "flux.1-dev-spread-diffusers.safetensors"
    base = load_file(str(sdxl))
    # mixed formats in one file; stray and broken keys; a shape that fits no family; LyCORIS LoHa factors
    mixed = {**base, **{f"x.{k}": v for k, v in list(load_file(str(flux)).items())[:6]}, "junk.weight": torch.zeros(2)}
    downs = [k for k in base if k.endswith(".lora_down.weight")]
    mixed[downs[0]] = torch.zeros(1, 7, dtype=torch.float16)
    for i, k in enumerate(downs[1:4]):
        stem, d, u = k[: -len(".lora_down.weight")], base[k], base[k.replace("lora_down", "lora_up")]
        mixed[stem + ".hada_w1_a"], mixed[stem + ".hada_w1_b"] = torch.zeros(u.shape[0], 2), torch.zeros(2, d.shape[1] + i)
        mixed[stem + ".hada_w2_a"], mixed[stem + ".hada_w2_b"] = torch.zeros(u.shape[0], 2), torch.zeros(2, d.shape[1])
    save_file(mixed, str(tmp / "mixed.safetensors"), {"ss_base_model_version": "sdxl_base_v1-0"})
    out.append((tmp / "mixed.safetensors", "safetensors"))
    # text-encoder-only (fits several families), with and without metadata naming one
    te = {k: v for k, v in base.items() if k.startswith("lora_te1_")}
    save_file(te, str(tmp / "te.safetensors"))
    save_file(te, str(tmp / "te-meta.safetensors"), {"ss_base_model_version": "sd_v1"})
    out += [(tmp / "te.safetensors", "safetensors"), (tmp / "te-meta.safetensors", "safetensors")]
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("fast"))


def _same_result(a: ParseResult, b: ParseResult) -> None:
    assert a.parsed == b.parsed
    assert a.unmapped == b.unmapped and list(a.unmapped) == list(b.unmapped)
    assert a.shape_mismatches == b.shape_mismatches and a.evidence == b.evidence


def test_fast_scoring_equals_the_plain_one_on_every_file(files):
    reg = get_registry()
    assert len(files) > 50
    for path, container in files:
        tensors, metadata, _ = open_tensors(path)
        fast, fast_results = score_candidates(tensors, metadata, reg, container)
        plain, plain_results = plain_scores(tensors, metadata, reg, container)
        key = lambda c: (c.format, c.variant, c.family)  # noqa: E731
        assert sorted(fast, key=key) == sorted(plain, key=key), path.name
        for k, res in fast_results.items():
            _same_result(res, plain_results[k])


def test_a_remembered_verdict_is_the_verdict(files, tmp_path):
    reg = get_registry()
    for path, container in files[::3] + files[-4:]:
        tensors, metadata, header = open_tensors(path)
        det, res = detect_tensors(tensors, metadata, reg, container)
        for _ in range(2):  # computed and remembered, then recalled
            again, res_again = detect_file(header, tensors, metadata, reg, tmp_path, container)
            assert again == det, path.name
            _same_result(res_again, res)
    assert list((tmp_path / "detection").rglob("*.json"))
