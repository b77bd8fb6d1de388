"""The Python API: load, detect, inspect, save, convert."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional, Union

from pydantic import BaseModel, Field

from ..core.hashes import (PLACEHOLDER_HASHES, EmbeddedHash, FileHashes, check_embedded, legacy_hash, own_fields, own_legacy_hash,
                           source_hash_fields, without_inherited_hashes)
from ..core.hash_memory import data_recipe, recall, remember, remembered_file_hashes, remembered_nonfinite
from ..core.version import __version__
from ..engine.cache import default_cache_root
from .refactor import ConversionReport, DroppedItem, check_target, plan_for
from .detect import Detection, detect_file
from ..core.errors import ConversionError, DetectionError, InputError
from ..core.io import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    LazyTensor,
    SafetensorsHeader,
    atomic_write_text,
    open_tensors,
    read_peft_directory,
    same_file,
    scan_nonfinite,
    write_safetensors,
)
from ..core.lora import Lora
from ..hub.pull import resolve_lora_ref
from ..registry import Registry, get_registry
from ..sources import civitai
from ..sources.civitai_refs import looks_like_civitai_ref
from ..sources.derive import family_for_model
from ..sources.refs import looks_like_hub_ref
from ..sources.weights import open_model
from .reader import LORA_ADAPTER_METADATA, assemble, parse_keys
from .writer import write_modules

PathLike = Union[str, Path]


def _read_source(path: Path) -> tuple[dict[str, LazyTensor], dict[str, str], str, Optional[dict], SafetensorsHeader]:
    """tensors, metadata, container, PEFT config, the weights file's header."""
    if not path.exists() and looks_like_civitai_ref(str(path)):  # civitai:<id>, a civitai.com URL, an AIR
        path = civitai.resolve(str(path), progress=True)[0]
    elif not path.exists() and looks_like_hub_ref(str(path)):  # hf://org/repo/file.safetensors@rev or org/repo[@rev]
        path = resolve_lora_ref(str(path))
    if path.is_dir():
        peft = read_peft_directory(path)
        tensors, metadata, header = open_tensors(peft.weights)
        return tensors, metadata, "peft_dir", peft.config, header
    tensors, metadata, header = open_tensors(path)
    return tensors, metadata, "safetensors", None, header


def _hint_metadata(metadata: dict[str, str], peft_config: Optional[dict]) -> dict[str, str]:
    hinted = dict(metadata)
    if peft_config and isinstance(peft_config.get("base_model_name_or_path"), str):
        hinted["base_model_name_or_path"] = peft_config["base_model_name_or_path"]
    return hinted


def _model_family(family: Optional[str], model: Optional[str]) -> Optional[str]:
    """``model`` (a base model reference) names the family: the registered one that matches it, else one
    derived from its own weights and config (lorareg.sources.derive)."""
    return family if model is None or family else family_for_model(str(model)).id


def detect(path: PathLike, *, format: Optional[str] = None, family: Optional[str] = None, model: Optional[str] = None) -> Detection:
    """Which key format and model family a LoRA file or PEFT folder is, with evidence (``model``: its base model)."""
    return _detect(Path(path), format, _model_family(family, model))[0]


def _detect(path: Path, format: Optional[str], family: Optional[str], registry: Optional[Registry] = None, on_header=None):
    """``on_header(weights header)``: called once the file is open, before detection (whose answer it returns
    in place of the header: the source's hashes start then, beside detection)."""
    registry = registry or get_registry()
    tensors, metadata, container, peft_config, weights = _read_source(path)
    started = on_header(weights) if on_header else weights
    if format:
        registry.format(format)
    if family:
        family = registry.family(family).id
    facts = civitai.lookup_ref(str(path)) if not path.exists() else None
    families = [family] if family else (facts.families if facts and facts.families else None)
    det, result = detect_file(
        weights,
        tensors,
        _hint_metadata(metadata, peft_config),
        registry,
        default_cache_root(),
        container,
        formats=[format] if format else None,
        families=families,
    )
    return det, result, tensors, metadata, peft_config, started


def load(path: PathLike, *, format: Optional[str] = None, family: Optional[str] = None, hash: bool = True,
         model: Optional[str] = None) -> Lora:
    """Read a LoRA file (or PEFT folder) of any known format into canonical modules.

    ``hash=False`` skips the source file's SHA-256 (``source_sha256`` stays None): provenance is then unknown.
    ``model``: the LoRA's base model, whose family (registered or derived) the LoRA is read against.
    """
    path = Path(path)
    family = _model_family(family, model)
    if not hash:
        return _read_lora(path, format, family)[0]
    # the provenance hash runs beside the rest: hashlib releases the GIL on large buffers
    with ThreadPoolExecutor(max_workers=1) as pool, _hashing_in(pool) as hashing:
        lora, digest = _read_lora(path, format, family, hashing)
        _set_source_hashes(lora, digest.result())
    return lora


def _set_source_hashes(lora: Lora, hashes: FileHashes) -> None:
    lora.source_sha256 = hashes.sha256
    lora.source_hashes = hashes.model_dump()


@contextmanager
def _stop_on_error():
    """An event set when the block is left on an error: a hash started beside the block ends early then (its
    pool would otherwise wait for a hash nobody reads)."""
    stop = threading.Event()
    try:
        yield stop
    except BaseException:
        stop.set()
        raise


@contextmanager
def _hashing_in(pool: ThreadPoolExecutor):
    """A starter of the source file's hashes in ``pool`` once its header is known (it returns a future of
    FileHashes); a file whose fingerprint the cache remembers is not hashed again; stopped on an error."""
    with _stop_on_error() as stop:
        yield lambda header: pool.submit(remembered_file_hashes, header, default_cache_root(), stop)


def _read_lora(path: Path, format: Optional[str], family: Optional[str], on_header=None):
    """Detect and assemble; ``on_header(header)`` starts work (the hashes) before detection."""
    det, result, tensors, metadata, peft_config, started = _detect(path, format, family, on_header=on_header)
    if result.unmapped:
        _refuse_mixed(det, result, tensors, metadata)
    lora = assemble(result, tensors, metadata, peft_config)
    lora.source_path = str(path)
    lora.undecided = list(det.undecided) if not family else []
    lora.undecided_names_differ = det.undecided_names_differ and not family
    facts = civitai.lookup_ref(str(path)) if not path.exists() else None
    if facts is not None:  # the API's trigger words feed the card and --refine's prompts; its facts, the provenance
        lora.metadata = {**lora.metadata, **civitai.provenance_metadata(facts)}
        if facts.trained_words and not (lora.metadata.get("modelspec.trigger_phrase") or "").strip():
            lora.metadata["modelspec.trigger_phrase"] = ", ".join(facts.trained_words)
    return lora, started


def _nonfinite_factors(lora: Lora) -> list:
    """The factor tensors holding NaN/Inf. Those still in a file are judged by what its fingerprint's memory
    knows of that file (one pass over a file the first time, none after); tensors made in memory are scanned."""
    root = default_cache_root()
    bad_in: dict[int, frozenset[str]] = {}

    def known_finite(t: LazyTensor) -> bool:
        where = t.stored()
        if where is None:
            return False
        header, info = where
        if id(header) not in bad_in:
            bad_in[id(header)] = remembered_nonfinite(header, root)
        return info.name not in bad_in[id(header)]

    return scan_nonfinite({f"{m.key}/{role}": t for m in lora.modules.values() for role, t in m.factors.items()}, known_finite)


def _refuse_mixed(det: Detection, result, tensors, metadata) -> None:
    """Keys that another format reads are a mixed file, not unknown keys: refuse it clearly."""
    others = [c for c in det.candidates if c.format != det.format and c.family == det.family]
    if not others:
        return
    registry = get_registry()
    other = others[0]
    variant = registry.format(other.format).variant(other.variant)
    leftover = {k: tensors[k] for k in result.unmapped}
    extra = parse_keys(variant, result.family, leftover)
    if extra.parsed:
        raise DetectionError(
            f"mixed key formats in one file: {len(result.parsed)} keys are {det.format}, "
            f"{len(extra.parsed)} are {other.format} (e.g. {next(iter(extra.parsed))!r}); split or convert them separately"
        )


class Inspection(BaseModel):
    path: str
    format: str
    variant: str
    family: str
    confidence: float
    fitting_families: list[str]
    undecided: list[str] = Field(default_factory=list)
    named_variant: Optional[str] = None
    adapter_type: str
    adapter_types: list[str]
    components: list[str]
    num_modules: int
    num_tensors: int
    ranks: dict[str, int]
    alphas: dict[str, int]
    dtypes: list[str]
    unmapped_keys: dict[str, str]
    nonfinite: list[dict] = Field(default_factory=list)
    evidence: list[str]
    metadata: dict[str, str]
    sha256: str
    hashes: FileHashes
    embedded_hashes: list[EmbeddedHash] = Field(description="the file's own hash fields checked against it: ok, wrong, absent")

    @property
    def wrong_hashes(self) -> list[EmbeddedHash]:
        return [h for h in self.embedded_hashes if h.status == "wrong"]


def inspect(path: PathLike, *, format: Optional[str] = None, family: Optional[str] = None, model: Optional[str] = None) -> Inspection:
    """Everything a user asks first about a LoRA file (``model``: its base model, when no registered family fits)."""
    path = Path(path)
    family = _model_family(family, model)
    # the file's hashes run beside detection (hashlib releases the GIL), remembered by its fingerprint
    with ThreadPoolExecutor(max_workers=1) as pool, _hashing_in(pool) as hashing:
        det, result, tensors, metadata, peft_config, (weights, hashes) = _detect(
            path, format, family, on_header=lambda header: (header, hashing(header)))
        if result.unmapped:
            _refuse_mixed(det, result, tensors, metadata)
        lora = assemble(result, tensors, metadata, peft_config)
        types = lora.adapter_types
        # one pass over the file (remembered by its fingerprint), then counts for the tensors that hold NaN/Inf
        bad = remembered_nonfinite(weights, default_cache_root())
        nonfinite = [nf.__dict__ for nf in scan_nonfinite({k: t for k, t in tensors.items() if k in bad})]
        shown_meta = {k: (v if len(v) <= 2000 else v[:2000] + f"... ({len(v)} chars)") for k, v in metadata.items()}
        hashes, legacy_in_header = hashes.result(), legacy_hash(weights)[1]
    return Inspection(
        path=str(path),
        format=det.format,
        variant=det.variant,
        family=det.family,
        confidence=det.confidence,
        fitting_families=det.fitting_families,
        undecided=det.undecided,
        named_variant=det.named_variant,
        adapter_type=lora.adapter_type,
        adapter_types=types,
        components=lora.components,
        num_modules=len(lora.modules),
        num_tensors=len(tensors),
        ranks=lora.ranks(),
        alphas=lora.alphas(),
        dtypes=sorted({t.dtype for t in tensors.values()}),
        unmapped_keys=lora.unmapped,
        nonfinite=nonfinite,
        evidence=det.evidence,
        metadata=shown_meta,
        sha256=hashes.sha256,
        hashes=hashes,
        embedded_hashes=check_embedded(metadata, hashes, legacy_in_header),
    )


def check_output(src: Optional[Path], dst: Path, force: bool) -> None:
    if src is not None and (same_file(src, dst) or (src.is_dir() and same_file(src / PEFT_WEIGHTS, dst))):
        raise InputError(f"{dst}: output would overwrite the input")
    if dst.exists() and not force:
        raise InputError(f"{dst}: already exists (use --force to replace it)")


def save(
    lora: Lora,
    path: PathLike,
    *,
    format: Optional[str] = None,
    variant: Optional[str] = None,
    rank: Optional[int] = None,
    force: bool = False,
    extra_metadata: Optional[dict[str, str]] = None,
    model: Optional[str] = None,
    drop_dora: bool = False,
) -> ConversionReport:
    """Write a LoRA in a format (default: the one it was read from). Atomic; never touches the input.

    ``model``: the base model (folder, checkpoint or Hub id), needed to refactor DoRA modules for a
    format without magnitudes and SVDiff modules into LoRA (with ``rank``); ``drop_dora`` drops the
    magnitudes instead (listed as dropped)."""
    return _save(lora, path, format=format, variant=variant, rank=rank, force=force, extra_metadata=extra_metadata,
                 model=model, drop_dora=drop_dora)


def _save(lora: Lora, path: PathLike, *, format: Optional[str], variant: Optional[str], rank: Optional[int], force: bool,
          extra_metadata: Optional[dict[str, str]], pending: Optional[Future] = None, model: Optional[str] = None,
          drop_dora: bool = False) -> ConversionReport:
    """``save``; ``pending``: the source's hashes, still computing (awaited only once the output's own
    hashes are done, so that both run at once)."""
    registry = get_registry()
    path = Path(path)
    src = Path(lora.source_path) if lora.source_path else None
    check_output(src, path, force)
    fmt_id = format or (lora.format_state.format if lora.format_state else None)
    if fmt_id is None:
        raise InputError("no output format given")
    fmt = registry.format(fmt_id)
    if variant:
        try:
            var = fmt.variant(variant)
        except KeyError:
            raise InputError(f"format {fmt.id} has no variant {variant!r}") from None
    elif lora.format_state and lora.format_state.format == fmt.id and not fmt.variant(lora.format_state.variant).spec.read_only:
        var = fmt.variant(lora.format_state.variant)
    else:
        var = fmt.write_variant_for(registry.family(lora.family)) if lora.family else fmt.default_write_variant
    if var is None:
        raise ConversionError(f"format {fmt.id} is read-only")
    family = registry.family(lora.family) if lora.family else None
    if family is None:
        raise InputError("the LoRA has no family; pass one")
    check_target(var)
    base = None
    if model is not None:
        base = open_model(family, model, lora.components)
    plan = plan_for(lora, var, rank, base=base, drop_dora=drop_dora)
    planned = Lora(
        family=lora.family,
        modules=plan.modules,
        metadata=lora.metadata,
        format_state=lora.format_state,
        source_path=lora.source_path,
        source_sha256=lora.source_sha256,
        unmapped=lora.unmapped,
    )
    written = write_modules(planned, var, family)
    tensors = {k: _lazy(t) for k, t in written.tensors.items()}
    meta = lambda source: _output_metadata(lora, fmt.id, var.id, written.metadata, extra_metadata, source)  # noqa: E731
    # the output's own hash fields: from its tensors and its ss_* metadata only (not lorareg.source_*); the
    # data section's SHA-256 is taken from the bytes as they are written, or remembered for the same bytes
    legacy = own_legacy_hash(tensors, meta(None))
    root = default_cache_root()
    recipe = data_recipe([tensors[n] for n in sorted(tensors)])
    known = recall(root, OUTPUT_DATA_HASHES, recipe, _load_data_sha256)
    hashed: list[str] = []

    def finish(data_sha256: str) -> dict[str, str]:
        hashed.append(data_sha256)
        if pending is not None:  # the source's hashes, computing beside this write
            _set_source_hashes(lora, pending.result())
        return {**meta(None), **own_fields(data_sha256, legacy)}

    placeholders = {**meta(PLACEHOLDER_HASHES if pending is not None else None), **own_fields(PLACEHOLDER_HASHES.tensor_sha256, legacy)}
    dropped = [DroppedItem(item=k, reason=v) for k, v in sorted(lora.unmapped.items())]
    dropped += plan.dropped + [DroppedItem(item=d.item, reason=d.reason) for d in written.dropped]
    if fmt.spec.container == "peft_dir":
        _write_peft_dir(path, tensors, placeholders, written.peft_config or {}, force, finish, known)
    else:
        write_safetensors(path, tensors, placeholders, finish=finish, data_sha256=known)
    if known is None and hashed:
        remember(root, OUTPUT_DATA_HASHES, recipe, json.dumps({"tensor_sha256": hashed[0]}))
    return ConversionReport(
        source_format=f"{lora.format_state.format}/{lora.format_state.variant}" if lora.format_state else "memory",
        target_format=var.qualified_id,
        family=family.id,
        modules_in=len(lora.modules),
        modules_out=len(plan.modules) - len({d.item for d in written.dropped if d.item in plan.modules}),
        tensors_in=sum(len(m.source_keys) for m in lora.modules.values()) + len(lora.unmapped),
        tensors_out=len(written.tensors),
        refactored=plan.refactored,
        dropped=dropped,
    )


def _lazy(t) -> LazyTensor:
    return t if isinstance(t, LazyTensor) else LazyTensor.from_torch(t)


#: the data-section SHA-256 of written files, by the identity of their bytes (hash_memory.data_recipe)
OUTPUT_DATA_HASHES = "output-data-sha256"


def _load_data_sha256(text: str) -> str:
    value = json.loads(text)["tensor_sha256"]
    if not (isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)):
        raise ValueError("damaged entry")
    return value


def _output_metadata(lora: Lora, fmt: str, variant: str, generated: dict[str, str], extra,
                     source: Optional[FileHashes] = None) -> dict[str, str]:
    """``source``: the source's hashes when not (yet) on ``lora`` (placeholders of their lengths)."""
    # the source's own hash fields describe the source's bytes, not this file's: dropped, then
    # recomputed for the written tensors; the source's hashes go under lorareg.source_*
    meta = {k: v for k, v in without_inherited_hashes(lora.metadata).items() if k != LORA_ADAPTER_METADATA}
    meta.update(generated)
    meta["lorareg.version"] = __version__
    if lora.undecided:  # never record a guess as if the file had said it
        meta.pop("lorareg.family", None)
        meta["lorareg.family_candidates"] = ",".join(lora.undecided)
    else:
        meta["lorareg.family"] = lora.family or ""
    meta["lorareg.format"] = f"{fmt}/{variant}"
    if lora.format_state is not None and lora.format_state.format != fmt:
        meta["lorareg.source_state"] = lora.format_state.model_dump_json()
    if lora.format_state is not None:
        meta["lorareg.source_format"] = f"{lora.format_state.format}/{lora.format_state.variant}"
    if lora.source_sha256:
        meta["lorareg.source_sha256"] = lora.source_sha256
    if source is not None:
        meta.update(source_hash_fields(source))
    elif lora.source_hashes:
        meta.update(source_hash_fields(FileHashes.model_validate(lora.source_hashes)))
    if extra:
        meta.update(extra)
    return meta


def _write_peft_dir(path: Path, tensors, metadata, config: dict, force: bool, finish=None, data_sha256=None) -> None:
    """Build the folder next to its destination, then swap it in (``finish``, ``data_sha256``: see write_safetensors)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        write_safetensors(tmp / PEFT_WEIGHTS, tensors, {"format": "pt", **metadata},
                          finish=(lambda sha: {"format": "pt", **finish(sha)}) if finish else None, data_sha256=data_sha256)
        atomic_write_text(tmp / PEFT_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
        if path.exists():
            if not force:
                raise InputError(f"{path}: already exists (use --force to replace it)")
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert(
    source: PathLike,
    output: PathLike,
    *,
    to: str,
    variant: Optional[str] = None,
    family: Optional[str] = None,
    rank: Optional[int] = None,
    force: bool = False,
    allow_unmapped: bool = False,
    allow_nonfinite: bool = False,
    model: Optional[str] = None,
    drop_dora: bool = False,
) -> ConversionReport:
    """Convert a LoRA file or PEFT folder to another key format (``model``: its base model, which names a derived
    family and holds the weights DoRA/SVDiff refactoring needs; ``drop_dora``: see save)."""
    family = _model_family(family, model)
    source, output = Path(source), Path(output)
    check_output(source, output, force)
    registry = get_registry()
    registry.format(to)
    with ThreadPoolExecutor(max_workers=1) as pool, _hashing_in(pool) as hashing:
        lora, digest = _read_lora(source, None, family, hashing)
        if lora.undecided and lora.undecided_names_differ:
            raise InputError(f"{source}: fits {', '.join(lora.undecided)} equally and its metadata names none, and they name "
                             "its modules differently: pass --family")
        if lora.unmapped and not allow_unmapped:
            key, reason = next(iter(lora.unmapped.items()))
            raise ConversionError(
                f"{len(lora.unmapped)} tensors map to no module (e.g. {key!r}: {reason}); "
                "pass --allow-unmapped to convert the rest and list them as dropped"
            )
        if not allow_nonfinite:  # scanned while the hash runs on the other core
            bad = _nonfinite_factors(lora)
            if bad:
                raise ConversionError(
                    f"{source}: {len(bad)} factor tensors hold NaN/Inf values; pass --allow-nonfinite to convert anyway"
                )
        return _save(lora, output, format=to, variant=variant, rank=rank, force=force, extra_metadata=None, pending=digest,
                     model=model, drop_dora=drop_dora)
