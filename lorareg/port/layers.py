"""The layer loop of a port: each resolved pair projected into the target's subspace, in low-rank form."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..core.io import DTYPES, LazyTensor
from ..core.lora import Lora, Module
from ..engine.relatedness import LayerRelatedness, Relatedness
from ..engine import DEFAULT_METHOD, DEFAULT_MISMATCH_METHOD, PortError, get_method, subspace_similarity
from ..formats.refactor import fold_tucker, to_plain_lora
from .bases import BasesStore, flat
from .options import AUTO, PortOptions
from .pairs import Pair
from .report import LayerReport, rounded

#: methods that return ΔW unchanged when the target weight is the source weight (docs/methods.md)
IDENTITY_ON_SAME_WEIGHT = ("copy", "prolora-full")


@dataclass
class ProjectedLayers:
    layers: list[LayerReport] = field(default_factory=list)
    modules: dict[str, Module] = field(default_factory=dict)
    seconds: float = 0.0


def project_layers(lora: Lora, pairs: list[Pair], bases: Optional[BasesStore], options: PortOptions, out_dtype: Optional[str],
                   device: torch.device, progress=None, streamed: Optional[Relatedness] = None) -> ProjectedLayers:
    """Port every pair of ``lora`` (bases None: no base weights, by names only); one report line per pair.

    ``streamed``: the streamed check's per-layer distance and cosine of the base weights, when it ran."""
    out = ProjectedLayers()
    by_layer = {l.name: l for l in streamed.layers} if streamed else {}
    for pair in pairs:
        rep = _project_one(lora.modules[pair.key], pair, bases, options, out_dtype, device, out, by_layer.get(pair.key))
        out.layers.append(rep)
        if progress:
            progress.update(1)
    return out


def _project_one(m: Module, pair: Pair, bases: Optional[BasesStore], options: PortOptions, out_dtype: Optional[str],
                 device: torch.device, out: ProjectedLayers, rel: Optional[LayerRelatedness]) -> LayerReport:
    method = options.method if options.method != AUTO else (DEFAULT_METHOD if pair.same_shape else DEFAULT_MISMATCH_METHOD)
    rep = LayerReport(source=pair.key, method=method, target=_target_key(pair), source_shape=pair.source_shape,
                      target_shape=pair.target_shape, rule=pair.rule, rank_in=m.rank, skipped=pair.skipped)
    if rel is not None:
        rep.relative_distance, rep.cosine = rounded(rel.relative_distance), rounded(rel.cosine)
    if pair.skipped:
        return rep
    rank = options.rank
    if m.kind != "lora" or "mid" in m.factors:
        if rank is None and m.kind != "lora":
            rep.skipped = f"{m.type_name} module: pass --rank to refactor it to plain LoRA before porting"
            return rep
        m, _ = to_plain_lora(m, rank or m.rank or 1) if m.kind != "lora" else (fold_tucker(m), 0.0)
    src_key, tgt_key = (pair.source_component, pair.source_module), (pair.target_component, pair.target_module)
    sb = bases.get(0, *src_key) if bases else None
    tb = bases.get(1, *tgt_key) if bases else None
    same_weight = (bases is not None and bases.same_weight(src_key, tgt_key)) or (rel is not None and rel.identical)
    if (method in IDENTITY_ON_SAME_WEIGHT and same_weight
            and rank in (None, m.rank) and out_dtype in (None, m.factors["up"].dtype) and pair.same_shape):
        # the very same base weight: these methods return ΔW unchanged, so keep the factors' bits
        rep.similarity = rep.similarity_in = rep.similarity_out = rep.kept_energy = 1.0
        rep.rank_out = m.rank
        new = Module(pair.target_component, pair.target_module, "lora", dict(m.factors), m.alpha, None, tuple(pair.target_shape), [])
        out.modules[new.key] = new
        return rep
    up, down = flat(m.factors["up"].float()), flat(m.factors["down"].float())
    t0 = time.perf_counter()
    try:
        proj = get_method(method)(up.to(device), down.to(device), source=sb, target=tb, rank=rank or m.rank)
    except PortError as e:
        rep.skipped = str(e).splitlines()[0]
        return rep
    out.seconds += time.perf_counter() - t0
    sim = proj.similarity
    if sim is None and sb is not None and tb is not None and sb.U.shape == tb.U.shape:
        sim = min(subspace_similarity(sb.U, tb.U), subspace_similarity(sb.V, tb.V))
    rep.similarity, rep.similarity_in, rep.similarity_out = rounded(sim), rounded(proj.similarity_in), rounded(proj.similarity_out)
    rep.kept_energy = rounded(proj.kept_energy)
    if sim is not None and sim < options.threshold:
        rep.skipped = f"similarity {sim:.3f} below threshold {options.threshold}"
        return rep
    new = _to_module(m, pair, proj.up.cpu(), proj.down.cpu(), out_dtype)
    rep.rank_out = new.rank
    out.modules[new.key] = new
    return rep


def _target_key(pair: Pair) -> Optional[str]:
    return f"{pair.target_component}:{pair.target_module}" if pair.target_module else None


def _to_module(m: Module, pair: Pair, up: torch.Tensor, down: torch.Tensor, out_dtype: Optional[str]) -> Module:
    tshape = tuple(pair.target_shape)
    r = up.shape[1]
    if len(tshape) == 4:
        down = down.reshape(r, *tshape[1:])
        up = up.reshape(tshape[0], r, 1, 1)
    torch_dtype = DTYPES[out_dtype or m.factors["up"].dtype][0]
    alpha = None if m.alpha is None else m.scale * r  # the scale (alpha / rank) is kept
    return Module(pair.target_component, pair.target_module, "lora",
                  {"down": LazyTensor.from_torch(down.to(torch_dtype).contiguous()), "up": LazyTensor.from_torch(up.to(torch_dtype).contiguous())},
                  alpha, None, tshape, [])
