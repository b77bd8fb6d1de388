"""`lorareg port`: move a LoRA onto another base model, layer by layer, training-free.

read LoRA -> resolve source/target module pairs -> read the two base weights of each pair (lazily)
-> top-k bases from the cache (randomized SVD on a miss, batched) -> similarity filter -> project in
low-rank form -> write the ported LoRA, report.json and a summary.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from pydantic import BaseModel, Field

from . import __version__
from .convert import fold_tucker, to_plain_lora
from .engine import DEFAULT_METHOD, DEFAULT_MISMATCH_METHOD, METHODS, BasisCache, PortError, default_k, get_method, top_k_batched, weight_digest
from .engine.bases import BASES_VERSION, Basis
from .engine.lowrank import energy
from .engine.similarity import subspace_similarity
from .errors import InputError
from .io import DTYPES, LazyTensor, atomic_write_text
from .lora import Lora, Module
from .refine.dispatch import RefineOptions, loss_summary, samples_summary
from .refine.dispatch import check_models as check_refine_models
from .refine.dispatch import check_pair as check_refine_pair
from .refine.dispatch import run as run_refine
from .registry import Family, get_registry
from . import experts as moe
from .resolve import Pair, align_groups, refusal, resolve_pairs
from .weights import BaseWeights, open_model

DEFAULT_THRESHOLD = 0.0
#: below this mean subspace similarity the two base models look unrelated (bench/fidelity: unrelated
#: models < 0.3, related checkpoints and distillations >= 0.79): the port is flagged
RELATED_MIN_SIMILARITY = 0.5
#: methods that return ΔW unchanged when the target weight is the source weight (docs/methods.md)
IDENTITY_ON_SAME_WEIGHT = ("copy", "prolora-full")
REPORT_NAME = "report.json"


AUTO = "auto"


class LayerReport(BaseModel):
    source: str
    method: Optional[str] = None
    target: Optional[str] = None
    source_shape: list[int]
    target_shape: Optional[list[int]] = None
    rule: str
    similarity: Optional[float] = None
    similarity_in: Optional[float] = None
    similarity_out: Optional[float] = None
    kept_energy: Optional[float] = None
    rank_in: Optional[int] = None
    rank_out: Optional[int] = None
    skipped: Optional[str] = None


class ModelInfo(BaseModel):
    ref: Optional[str] = None
    family: str
    revision: Optional[str] = None
    layout: Optional[str] = None


class PortTotals(BaseModel):
    layers: int
    ported: int
    skipped: int
    mean_similarity: Optional[float] = None
    min_similarity: Optional[float] = None
    energy_kept: Optional[float] = Field(None, description="‖ΔW_out‖² / ‖ΔW_in‖² summed over ported layers")
    energy_skipped: Optional[float] = Field(None, description="share of the LoRA's energy (‖ΔW‖² summed) in the source layers that were skipped")
    related: Optional[bool] = Field(None, description=f"mean similarity of the compared layers >= {RELATED_MIN_SIMILARITY}")
    related_similarity: Optional[float] = Field(None, description="mean similarity over every compared layer, ported or not")


class PortReport(BaseModel):
    lorareg_version: str = __version__
    method: str
    rank_k: Optional[int] = Field(None, description="subspace size k (None: per-layer default)")
    threshold: float
    rank: Optional[int] = None
    device: str
    source_lora: dict[str, Any]
    source_model: ModelInfo
    target_model: ModelInfo
    output: Optional[dict[str, Any]] = None
    layers: list[LayerReport]
    totals: PortTotals
    timings: dict[str, float]
    cache: dict[str, int]
    refine: Optional[dict[str, Any]] = None
    experts: Optional[dict[str, str]] = Field(None, description="for a two-expert target (Wan 2.2 A14B): component -> the noise range it denoises")
    warnings: list[str] = Field(default_factory=list)


@dataclass
class PortResult:
    lora: Lora
    report: PortReport
    output: Optional[Path] = None
    report_path: Optional[Path] = None
    summary: str = ""
    #: one file per expert when the output format holds one expert per file (Wan 2.2 in ComfyUI / musubi keys)
    files: list[Path] = field(default_factory=list)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"unknown device {device!r} (auto, cpu, cuda)")
    return torch.device(device)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _flat_shape(shape) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:]))


@dataclass
class _Bases:
    """Top-k bases of base-model weights, through the content-addressed cache, built in batches."""

    cache: BasisCache
    device: torch.device
    k: Optional[int]
    built: int = 0
    seconds_read: float = 0.0
    seconds_build: float = 0.0
    memo: dict[tuple[int, str, str], Basis] = field(default_factory=dict)
    digests: dict[tuple[int, str, str], str] = field(default_factory=dict)

    def k_for(self, shape) -> int:
        return self.k if self.k else default_k(shape)

    def get_many(self, model: BaseWeights, side: int, modules: list[tuple[str, str]], progress=None) -> None:
        """Fill the memo for these modules: cache hits first, then batched randomized SVDs."""
        pending: list[tuple[tuple[int, str, str], torch.Tensor, str, int]] = []
        from .engine.cache import BasisKey

        for cid, name in modules:
            key = (side, cid, name)
            if key in self.memo:
                continue
            t0 = time.perf_counter()
            shape = model.family.components[cid].modules[name]
            k = min(self.k_for(_flat_shape(shape)), min(_flat_shape(shape)))
            fp = model.fingerprint(cid, name)
            digest = self._known_digest(fp)
            w = None
            if digest is None:
                w = _flat(model.weight(cid, name))
                digest = weight_digest(w)
                self._remember_digest(fp, digest)
            self.digests[key] = digest
            self.seconds_read += time.perf_counter() - t0
            hit = self.cache.get(BasisKey(digest, k, BASES_VERSION))
            if hit is not None:
                self.memo[key] = hit
                if progress:
                    progress.update(1)
                continue
            if w is None:
                w = _flat(model.weight(cid, name))
            pending.append((key, w, digest, k))
            if sum(p[1].numel() for p in pending) > 64 * 2**20:
                self._build(pending, progress)
                pending = []
        self._build(pending, progress)

    def _digest_path(self, fp: str) -> Path:
        return self.cache.root / "digests" / fp[:2] / fp

    def _known_digest(self, fp: Optional[str]) -> Optional[str]:
        """The content digest remembered for a weight fingerprint (skips re-hashing known files)."""
        if fp is None:
            return None
        try:
            text = self._digest_path(fp).read_text().strip()
        except OSError:
            return None
        return text if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else None

    def _remember_digest(self, fp: Optional[str], digest: str) -> None:
        if fp is None:
            return
        try:
            atomic_write_text(self._digest_path(fp), digest + "\n")
        except OSError:
            pass  # a read-only cache still works, it just hashes again next time

    def _build(self, pending, progress) -> None:
        if not pending:
            return
        from .engine.cache import BasisKey

        t0 = time.perf_counter()
        by_k: dict[int, list] = {}
        for item in pending:
            by_k.setdefault(item[3], []).append(item)
        for k, items in by_k.items():
            bases = top_k_batched([w for _, w, _, _ in items], k, self.device)
            for (key, _, digest, _), basis in zip(items, bases):
                basis = basis.to("cpu")
                self.cache.put(BasisKey(digest, k, BASES_VERSION), basis)
                self.memo[key] = basis
                self.built += 1
                if progress:
                    progress.update(1)
        self.seconds_build += time.perf_counter() - t0


def _progress(total: int, desc: str, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", leave=False)


def port(
    lora: Union[str, Path, Lora],
    *,
    source_model: Optional[str] = None,
    target_model: Optional[str] = None,
    to: Optional[str] = None,
    method: str = AUTO,
    rank_k: Optional[int] = None,
    threshold: float = DEFAULT_THRESHOLD,
    rank: Optional[int] = None,
    device: str = "auto",
    dtype: Optional[str] = None,
    output: Optional[Union[str, Path]] = None,
    format: Optional[str] = None,
    force: bool = False,
    cache_dir: Optional[Union[str, Path]] = None,
    align_blocks: bool = True,
    progress: bool = True,
    refine: Optional[str] = None,
    refine_steps: int = 100,
    refine_samples: int = 64,
    refine_sample_length: int = 128,
    refine_lr: Optional[float] = None,
    refine_seed: int = 0,
    refine_budget_seconds: Optional[float] = None,
    refine_batch: Optional[int] = None,
    refine_prompts: Optional[list[str]] = None,
    refine_conditions: Optional[torch.Tensor] = None,
    refine_latent_size: Optional[int] = None,
    refine_sampler_steps: int = 8,
    refine_noisings: int = 4,
    refine_guidance: float = 5.0,
    force_unrelated: bool = False,
    family: Optional[str] = None,
    expert: Optional[str] = None,
) -> PortResult:
    """Port a LoRA from its base model to a target model; write it (and report.json) if ``output``.

    ``refine="distill"``: after the projection, train the ported LoRA on the target to match the
    source model + LoRA on samples the source generates itself (data-free self-distillation, for
    language models and diffusion UNets; see lorareg.refine). Refused on unrelated base models unless
    ``force_unrelated``. ``refine_sample_length`` applies to language models; ``refine_prompts``,
    ``refine_conditions``, ``refine_latent_size``, ``refine_sampler_steps``, ``refine_noisings`` and
    ``refine_guidance`` to UNets.

    ``family`` names the LoRA's family when its shapes and metadata do not decide (HunyuanVideo T2V vs
    I2V, Wan 2.1 vs a Wan 2.2 expert, FLUX.1 [dev] vs Krea). ``expert`` (high|low): for a Wan 2.2 source,
    which expert a single-expert file holds; for a Wan 2.2 target, write only that expert (default both).
    """
    from .api import _check_output, load, save

    t_start = time.perf_counter()
    if method != AUTO and method not in METHODS:
        raise InputError(f"unknown method {method!r} (known: {AUTO}, {', '.join(METHODS)})")
    if not 0.0 <= threshold <= 1.0:
        raise InputError("--threshold must be between 0 and 1")
    if output is not None:
        out_path = Path(output)
        if isinstance(lora, (str, Path)):
            _check_output(Path(lora), out_path, force)
        elif out_path.exists() and not force:
            raise InputError(f"{out_path}: already exists (use --force to replace it)")
    src_lora = lora if isinstance(lora, Lora) else load(lora, family=family)
    registry = get_registry()
    if src_lora.family is None:
        raise InputError("the LoRA's family is unknown; load it with family=...")
    if src_lora.undecided:
        raise InputError(f"the LoRA fits {', '.join(src_lora.undecided)} equally (same module shapes) and its metadata names "
                         "none of them: pass --family to say which base it was trained on")
    src_fam = registry.family(src_lora.family)
    tgt_fam = registry.family(to) if to else src_fam
    src_lora, target_expert = _experts_in(src_lora, src_fam, tgt_fam, expert)
    why_not = refusal(src_fam, tgt_fam) if src_fam.id != tgt_fam.id else None
    if why_not and method != "align":
        raise InputError(f"{src_fam.id} -> {tgt_fam.id} refused: {why_not}")
    dev = resolve_device(device)
    needs_weights = method not in ("copy", AUTO)
    if needs_weights and (source_model is None or target_model is None):
        raise InputError(f"--method {method} needs --source-model and --target-model (copy and auto need neither)")
    if (source_model is None) != (target_model is None):
        raise InputError("give both --source-model and --target-model, or neither")
    out_dtype = _dtype_name(dtype) if dtype else None
    refine_kind = check_refine_pair(refine, src_fam, tgt_fam) if refine is not None else None

    with_models = source_model is not None
    pairs = resolve_pairs(src_fam, tgt_fam, [(m.component, m.name) for m in src_lora.modules.values()],
                          allow_shape_mismatch=(method == "align" or (method == AUTO and with_models)))
    if target_expert is not None:  # --expert on a two-expert target: only that expert's pairs
        pairs = [p for p in pairs if p.target_component in (None, target_expert)]
    t0 = time.perf_counter()
    configs = refine is not None  # a refinement runs the models: it needs their configs and tokenizers too
    src_w = open_model(src_fam, source_model, src_lora.components, with_configs=configs) if source_model else None
    tgt_components = sorted({p.target_component for p in pairs if p.target_component})
    tgt_w = open_model(tgt_fam, target_model, tgt_components, with_configs=configs) if target_model else None
    t_open = time.perf_counter() - t0
    if refine_kind is not None:
        if src_w is None or tgt_w is None:
            raise InputError("--refine distill needs --source-model and --target-model")
        check_refine_models(refine_kind, src_w.folder(), tgt_w.folder())

    cache = BasisCache(cache_dir) if cache_dir else BasisCache()
    bases = _Bases(cache, dev, rank_k)
    with_weights = src_w is not None and tgt_w is not None
    if with_weights:
        pairs = _resolve_with_weights(pairs, src_fam, tgt_fam, src_w, tgt_w, bases, align_blocks, progress)

    layers: list[LayerReport] = []
    out_modules: dict[str, Module] = {}
    t_proj = 0.0
    bar = _progress(len(pairs), "projecting", progress)
    for pair in pairs:
        m = src_lora.modules[pair.key]
        layer_method = method if method != AUTO else (DEFAULT_METHOD if pair.same_shape else DEFAULT_MISMATCH_METHOD)
        rep = LayerReport(source=pair.key, method=layer_method, target=_tkey(pair), source_shape=pair.source_shape,
                          target_shape=pair.target_shape, rule=pair.rule, rank_in=m.rank, skipped=pair.skipped)
        layers.append(rep)
        if bar:
            bar.update(1)
        if pair.skipped:
            continue
        if m.kind != "lora" or "mid" in m.factors:
            if rank is None and m.kind != "lora":
                rep.skipped = f"{m.type_name} module: pass --rank to refactor it to plain LoRA before porting"
                continue
            m, _ = to_plain_lora(m, rank or m.rank or 1) if m.kind != "lora" else (fold_tucker(m), 0.0)
        up = _flat(m.factors["up"].float())
        down = _flat(m.factors["down"].float())
        sb = bases.memo.get((0, pair.source_component, pair.source_module)) if with_weights else None
        tb = bases.memo.get((1, pair.target_component, pair.target_module)) if with_weights else None
        d_s = bases.digests.get((0, pair.source_component, pair.source_module))
        if (layer_method in IDENTITY_ON_SAME_WEIGHT and d_s is not None and d_s == bases.digests.get((1, pair.target_component, pair.target_module))
                and rank in (None, m.rank) and out_dtype in (None, m.factors["up"].dtype) and pair.same_shape):
            # the very same base weight: these methods return ΔW unchanged, so keep the factors' bits
            rep.similarity = rep.similarity_in = rep.similarity_out = rep.kept_energy = 1.0
            rep.rank_out = m.rank
            new = Module(pair.target_component, pair.target_module, "lora", dict(m.factors), m.alpha, None, tuple(pair.target_shape), [])
            out_modules[new.key] = new
            continue
        t1 = time.perf_counter()
        try:
            proj = get_method(layer_method)(up.to(dev), down.to(dev), source=sb, target=tb, rank=rank or m.rank)
        except PortError as e:
            rep.skipped = str(e).splitlines()[0]
            continue
        t_proj += time.perf_counter() - t1
        sim = proj.similarity
        if sim is None and sb is not None and tb is not None and sb.U.shape == tb.U.shape:
            sim = min(subspace_similarity(sb.U, tb.U), subspace_similarity(sb.V, tb.V))
        rep.similarity, rep.similarity_in, rep.similarity_out = _r(sim), _r(proj.similarity_in), _r(proj.similarity_out)
        rep.kept_energy = _r(proj.kept_energy)
        if sim is not None and sim < threshold:
            rep.skipped = f"similarity {sim:.3f} below threshold {threshold}"
            continue
        new = _to_module(m, pair, proj.up.cpu(), proj.down.cpu(), out_dtype, tgt_fam)
        rep.rank_out = new.rank
        out_modules[new.key] = new
    if bar:
        bar.close()

    ported = Lora(family=tgt_fam.id, modules=out_modules, metadata=dict(src_lora.metadata),
                  format_state=src_lora.format_state, source_path=src_lora.source_path, source_sha256=src_lora.source_sha256)
    totals = _totals(layers, src_lora)
    warnings = []
    if totals.related is False:
        warnings.append(
            f"the base models look unrelated: mean subspace similarity {totals.related_similarity:.2f} < {RELATED_MIN_SIMILARITY}; "
            "a training-free port is unlikely to carry the LoRA's effect (use --threshold to skip such layers)"
        )
    report = PortReport(
        method=method,
        rank_k=rank_k,
        threshold=threshold,
        rank=rank,
        device=str(dev),
        source_lora={"path": src_lora.source_path, "sha256": src_lora.source_sha256, "family": src_fam.id,
                     "format": f"{src_lora.format_state.format}/{src_lora.format_state.variant}" if src_lora.format_state else None,
                     "modules": len(src_lora.modules)},
        source_model=_model_info(src_w, src_fam, source_model),
        target_model=_model_info(tgt_w, tgt_fam, target_model),
        layers=layers,
        totals=totals,
        timings={"open_s": round(t_open, 3), "read_weights_s": round(bases.seconds_read, 3),
                 "build_bases_s": round(bases.seconds_build, 3), "project_s": round(t_proj, 3)},
        cache={"hits": cache.hits, "misses": cache.misses, "built": bases.built},
        experts=({tgt_fam.spec.experts.high_noise: "high_noise", tgt_fam.spec.experts.low_noise: "low_noise"}
                 if tgt_fam.spec.experts else None),
        warnings=warnings,
    )
    if refine is not None:
        if totals.related is False and not force_unrelated:
            raise InputError(
                f"the base models look unrelated (mean similarity {totals.related_similarity:.2f}); distillation would retrain "
                "the LoRA, not port it; pass --force-unrelated to refine anyway")
        if not out_modules:
            raise InputError("no layer could be ported (see the report: every layer was skipped); nothing to refine")
        options = RefineOptions(steps=refine_steps, samples=refine_samples, sample_length=refine_sample_length, lr=refine_lr,
                                seed=refine_seed, budget_seconds=refine_budget_seconds, batch=refine_batch, prompts=refine_prompts,
                                conditions=refine_conditions, latent_size=refine_latent_size, sampler_steps=refine_sampler_steps,
                                noisings=refine_noisings, guidance=refine_guidance)
        t3 = time.perf_counter()
        ported, refine_report = run_refine(refine_kind, ported, source_lora=src_lora, source_family=src_fam, target_family=tgt_fam,
                                           source_folder=src_w.folder(), target_folder=tgt_w.folder(), options=options, device=dev,
                                           progress=progress, start_method=method, cache_dir=Path(cache_dir) if cache_dir else None)
        out_modules = ported.modules
        report.refine = refine_report
        report.timings["refine_s"] = round(time.perf_counter() - t3, 3)
    result = PortResult(lora=ported, report=report)
    if output is not None:
        if not out_modules:
            raise InputError("no layer could be ported (see the report: every layer was skipped); nothing written")
        out_path = Path(output)
        meta = _provenance(report, method)
        t2 = time.perf_counter()
        out_format = format or (src_lora.format_state.format if src_lora.format_state else "diffusers")
        parts = moe.split(ported, tgt_fam, out_format)
        if parts is None:
            conv = save(ported, out_path, format=out_format, force=True, extra_metadata=meta)
            report.output = {"path": str(out_path), "format": conv.target_format, "dropped": [d.model_dump() for d in conv.dropped]}
        else:
            # ComfyUI / musubi load one expert per file: <name>_high_noise / <name>_low_noise
            paths = moe.split_paths(out_path, tgt_fam)
            for w in parts:
                if paths[w].exists() and not force:
                    raise InputError(f"{paths[w]}: already exists (use --force to replace it)")
            files, dropped = [], []
            for w, part in parts.items():
                conv = save(part, paths[w], format=out_format, force=True, extra_metadata={**meta, "lorareg.expert": w})
                files.append({"path": str(paths[w]), "expert": w, "component": tgt_fam.spec.experts.component(w)})
                dropped += [d.model_dump() for d in conv.dropped]
            report.output = {"path": str(out_path), "format": conv.target_format, "files": files, "dropped": dropped}
        report.timings["write_s"] = round(time.perf_counter() - t2, 3)
        report.timings["total_s"] = round(time.perf_counter() - t_start, 3)
        report_path = (out_path if out_path.is_dir() else out_path.parent) / (REPORT_NAME if out_path.is_dir() else out_path.stem + "." + REPORT_NAME)
        atomic_write_text(report_path, report.model_dump_json(indent=2) + "\n")
        result.output, result.report_path = out_path, report_path
        if report.output.get("files"):
            result.files = [Path(f["path"]) for f in report.output["files"]]
    else:
        report.timings["total_s"] = round(time.perf_counter() - t_start, 3)
    result.summary = summarize(report)
    return result


def _experts_in(lora: Lora, src_fam: Family, tgt_fam: Family, expert: Optional[str]) -> tuple[Lora, Optional[str]]:
    """Apply --expert: to a two-expert source it says which expert the file holds; to a two-expert target, which to write."""
    held = moe.from_metadata(lora) if src_fam.spec.experts is not None else None
    if held is not None and {m.component for m in lora.modules.values()} == {src_fam.spec.experts.high_noise}:
        lora = moe.assign(lora, src_fam, held)  # a single-expert file that says which expert it holds
    elif expert is not None and src_fam.spec.experts is not None:
        lora = moe.assign(lora, src_fam, expert)
        expert = None if tgt_fam.spec.experts is None or tgt_fam.id == src_fam.id else expert
    else:
        moe.require_known(lora, src_fam)
    if expert is None:
        return lora, None
    if tgt_fam.spec.experts is None:
        raise InputError(f"--expert: neither {src_fam.id} nor {tgt_fam.id} has two experts")
    return lora, tgt_fam.spec.experts.component(moe.which(expert))


def _resolve_with_weights(pairs, src_fam, tgt_fam, src_w, tgt_w, bases: _Bases, align: bool, progress) -> list[Pair]:
    live = [p for p in pairs if not p.skipped or p.target_module]
    src_mods = [(p.source_component, p.source_module) for p in live]
    tgt_mods = {(p.target_component, p.target_module) for p in live if p.target_shape}
    if align and src_fam.id != tgt_fam.id:
        # candidate blocks of searched groups need target bases too
        from .resolve import correspondence

        doc = correspondence(get_registry(), src_fam.id, tgt_fam.id)
        if doc and doc.get("search"):
            tgt_mods |= _group_candidates(doc, pairs, tgt_fam)
    bar = _progress(len(src_mods) + len(tgt_mods), "bases", progress)
    bases.get_many(src_w, 0, src_mods, bar)
    bases.get_many(tgt_w, 1, sorted(tgt_mods), bar)
    if bar:
        bar.close()
    if align and src_fam.id != tgt_fam.id:

        def sim(pair: Pair, candidate: str) -> Optional[float]:
            sb = bases.memo.get((0, pair.source_component, pair.source_module))
            tb = bases.memo.get((1, pair.target_component or pair.source_component, candidate))
            if sb is None or tb is None or sb.U.shape != tb.U.shape:
                return None
            return subspace_similarity(sb.U, tb.U)

        pairs = align_groups(pairs, src_fam, tgt_fam, sim)
    return pairs


def _group_candidates(doc, pairs, tgt_fam) -> set[tuple[str, str]]:
    from .registry.naming import Pattern

    out = set()
    for search in doc["search"]:
        tcid = doc["components"].get(search["component"])
        comp = tgt_fam.components.get(tcid or "")
        if comp is None:
            continue
        pattern = Pattern.parse("^" + search["group"])
        leaves = set()
        for p in pairs:
            found = pattern.search(p.source_module.split(".")) if p.source_component == search["component"] else None
            if found:
                leaves.add(".".join(p.source_module.split(".")[found[0] + len(pattern.segments):]))
        for name in comp.modules:
            found = pattern.search(name.split("."))
            if found and ".".join(name.split(".")[found[0] + len(pattern.segments):]) in leaves:
                out.add((tcid, name))
    return out


def _tkey(pair: Pair) -> Optional[str]:
    return f"{pair.target_component}:{pair.target_module}" if pair.target_module else None


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(float(x), 6)


def _dtype_name(name: str) -> str:
    aliases = {"fp16": "F16", "float16": "F16", "bf16": "BF16", "bfloat16": "BF16", "fp32": "F32", "float32": "F32"}
    st = aliases.get(name.lower(), name.upper())
    if st not in ("F16", "BF16", "F32"):
        raise InputError(f"unsupported --dtype {name!r} (fp16, bf16, fp32)")
    return st


def _to_module(m: Module, pair: Pair, up: torch.Tensor, down: torch.Tensor, out_dtype: Optional[str], fam: Family) -> Module:
    tshape = tuple(pair.target_shape)
    r = up.shape[1]
    if len(tshape) == 4:
        down = down.reshape(r, *tshape[1:])
        up = up.reshape(tshape[0], r, 1, 1)
    st = out_dtype or m.factors["up"].dtype
    torch_dtype = DTYPES[st][0]
    alpha = None if m.alpha is None else m.scale * r  # the scale (alpha / rank) is kept
    return Module(pair.target_component, pair.target_module, "lora",
                  {"down": LazyTensor.from_torch(down.to(torch_dtype).contiguous()), "up": LazyTensor.from_torch(up.to(torch_dtype).contiguous())},
                  alpha, None, tshape, [])


def _totals(layers: list[LayerReport], lora: Lora) -> PortTotals:
    ported = [l for l in layers if not l.skipped]
    sims = [l.similarity for l in ported if l.similarity is not None]
    energy_in = {l.source: _energy(lora.modules[l.source]) for l in layers}
    # a source layer copied into several targets (both Wan 2.2 experts) counts once: each target gets its share
    fanout: dict[str, int] = {}
    for l in layers:
        fanout[l.source] = fanout.get(l.source, 0) + 1
    energy_out = sum(energy_in[l.source] * l.kept_energy / fanout[l.source] for l in ported if l.kept_energy is not None)
    all_in = sum(energy_in.values())
    reached = {l.source for l in ported}
    energy_skipped = sum(e for src, e in energy_in.items() if src not in reached)
    compared = [l.similarity for l in layers if l.similarity is not None]
    related_sim = sum(compared) / len(compared) if compared else None
    return PortTotals(
        related=None if related_sim is None else related_sim >= RELATED_MIN_SIMILARITY,
        related_similarity=_r(related_sim),
        layers=len(layers),
        ported=len(ported),
        skipped=len(layers) - len(ported),
        mean_similarity=_r(sum(sims) / len(sims)) if sims else None,
        min_similarity=_r(min(sims)) if sims else None,
        energy_kept=_r(energy_out / all_in) if all_in > 0 else None,
        energy_skipped=_r(energy_skipped / all_in) if all_in > 0 else None,
    )


def _energy(m: Module) -> float:
    if m.kind != "lora":
        return 0.0
    return energy(_flat(m.factors["up"].float()), _flat(m.factors["down"].float())) * m.scale**2


def _model_info(w: Optional[BaseWeights], fam: Family, ref: Optional[str]) -> ModelInfo:
    return ModelInfo(ref=str(ref) if ref else None, family=fam.id, revision=w.revision if w else None, layout=w.layout if w else None)


def _provenance(report: PortReport, method: str) -> dict[str, str]:
    t = report.totals
    return {
        "lorareg.port.method": method,
        "lorareg.port.source_model": report.source_model.ref or "",
        "lorareg.port.source_revision": report.source_model.revision or "",
        "lorareg.port.target_model": report.target_model.ref or "",
        "lorareg.port.target_revision": report.target_model.revision or "",
        "lorareg.port.target_family": report.target_model.family,
        "lorareg.port.layers": json.dumps({"ported": t.ported, "skipped": t.skipped, "mean_similarity": t.mean_similarity, "energy_kept": t.energy_kept}),
        "lorareg.port.params": json.dumps({"rank_k": report.rank_k, "threshold": report.threshold, "rank": report.rank}),
    }


def summarize(report: PortReport) -> str:
    t = report.totals
    lines = [
        f"ported {report.source_lora.get('path')} ({report.source_model.family}) -> {report.target_model.family} with {report.method}",
        f"  layers: {t.ported} ported, {t.skipped} skipped of {t.layers}",
    ]
    if t.mean_similarity is not None:
        lines.append(f"  subspace similarity: mean {t.mean_similarity:.3f}, min {t.min_similarity:.3f}")
    if t.energy_kept is not None:
        lines.append(f"  energy of the LoRA kept: {100 * t.energy_kept:.1f}%")
    if t.energy_skipped:
        lines.append(f"  energy of the LoRA in skipped layers: {100 * t.energy_skipped:.1f}%")
    reasons: dict[str, int] = {}
    for l in report.layers:
        if l.skipped:
            reasons[l.skipped] = reasons.get(l.skipped, 0) + 1
    for why, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
        lines.append(f"  skipped {n}: {why}")
    for w in report.warnings:
        lines.append(f"  WARNING: {w}")
    lines.append(f"  bases: {report.cache.get('hits', 0)} from cache, {report.cache.get('built', 0)} built; time {report.timings.get('total_s', 0):.2f} s")
    if report.refine:
        r = report.refine
        name, start, end = loss_summary(r)
        lines.append(f"  refined ({r['method']}, {r['steps']} steps, {samples_summary(r)}, {r['wall_s']:.1f} s): "
                     f"{name} {start:.4f} -> {end:.4f} (data-free quality signal: lower is closer to source + LoRA)")
    if report.output and report.output.get("files"):
        for f in report.output["files"]:
            lines.append(f"  wrote {f['path']} ({report.output['format']}): the {f['expert'].replace('_', '-')} expert ({f['component']})")
    elif report.output:
        lines.append(f"  wrote {report.output['path']} ({report.output['format']})")
        if report.experts:
            held = {l.target.split(":")[0] for l in report.layers if l.target and not l.skipped}
            lines += [f"    {c}: the {w.replace('_', '-')} expert" for c, w in report.experts.items() if c in held]
    return "\n".join(lines)
