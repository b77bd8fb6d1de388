"""`lorareg scan`: an inventory of a LoRA library, one row per file, in parallel, with a fingerprint cache.

Each file is read through the public API (:func:`lorareg.inspect`); nothing is ever unpickled (a pickle
is recognised by its first bytes and reported). A file that fails is a row with its reason. Rows are
cached by file fingerprint (size, mtime_ns, inode) together with the lorareg version and the registry's
data roots, so an unchanged library re-scans with one ``stat`` per file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from pydantic import BaseModel, Field

from ..core.errors import DetectionError, InputError, LoraregError
from ..core.progress import progress_bar
from ..core.io import PEFT_CONFIG, PEFT_WEIGHTS, atomic_write_text, is_pickle
from ..core.version import __version__
from ..engine.cache import default_cache_root
from ..formats.api import Inspection, inspect
from ..registry import get_registry
from ..registry.data import data_roots
from ..sources.civitai_lookup import lookup_hashes
from ..sources.refs import looks_like_hub_ref
from .workers import default_workers, process_pool

#: files a library holds LoRAs in; pickles are listed (and refused) so that they show up in the inventory
LORA_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LIST_SUFFIXES = (".txt", ".lst")
CACHE_FORMAT = "lorareg-scan-1"


class ScanRow(BaseModel):
    """What a library manager asks about one file."""

    path: str
    ok: bool = Field(description="the file reads as a LoRA lorareg can use (problems may still be listed)")
    size: Optional[int] = None
    format: Optional[str] = None
    variant: Optional[str] = None
    family: Optional[str] = None
    confidence: Optional[float] = None
    fitting_families: list[str] = Field(default_factory=list)
    adapter_type: Optional[str] = None
    ranks: dict[str, int] = Field(default_factory=dict, description="rank -> number of modules")
    modules: Optional[int] = None
    components: list[str] = Field(default_factory=list)
    text_encoders: list[str] = Field(default_factory=list, description="components whose role is text_encoder")
    dtypes: list[str] = Field(default_factory=list)
    sha256: Optional[str] = None
    hashes: dict[str, str] = Field(default_factory=dict, description="AutoV2, tensor-data hash... (when computed)")
    embedded_hashes: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="metadata field -> {value, ok}; ok is None when it could not be checked")
    problems: list[str] = Field(default_factory=list, description="'kind: detail'; kinds: broken, pickle, mixed, "
                                "undetected, ambiguous, nan, unmapped, embedded-hash")
    error: Optional[str] = Field(None, description="why the file cannot be used (ok is False)")
    civitai: Optional[dict[str, Any]] = Field(None, description="with civitai=True: the Civitai version this file is "
                                              "(matched_by sha256 or autov3, version_id, model, page_url), or {} when none")
    seconds: float = 0.0
    cached: bool = False


class ScanSummary(BaseModel):
    files: int
    ok: int
    failed: int
    cached: int
    seconds: float
    by_family: dict[str, int]
    by_format: dict[str, int]
    problems: dict[str, int]


class ScanResult(BaseModel):
    rows: list[ScanRow]
    summary: ScanSummary


# -- hashes: one place, so that lorareg.core.hashes can take over -----------------------------------

def _hashes(info: Inspection) -> tuple[str, dict[str, str], dict[str, dict]]:
    """(SHA-256, the other hashes, the embedded hash fields checked) from an inspection (lorareg.core.hashes)."""
    embedded = {h.key: {"value": h.embedded, "ok": None if h.status == "unverifiable" else h.status == "ok", "expected": h.expected}
                for h in info.embedded_hashes if h.status != "absent"}
    return info.sha256, info.hashes.model_dump(exclude={"sha256"}), embedded


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file inspect could not read (a broken file or a pickle is still identified)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- one file ---------------------------------------------------------------------------------------

def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(9)
    except OSError:
        return b""


def scan_one(ref: str) -> ScanRow:
    """One row for a LoRA file, PEFT folder or Hub reference; never raises for a bad file."""
    t0 = time.perf_counter()
    path = Path(ref)
    row = ScanRow(path=ref, ok=False)
    try:
        if path.is_file():
            row.size = path.stat().st_size
            head = _head(path)
            if is_pickle(head, row.size):
                row.sha256 = _file_sha256(path)
                row.problems.append("pickle: a pickle/PyTorch checkpoint (never unpickled); convert it to .safetensors")
                row.error = row.problems[-1]
                return row
        info = inspect(path)
        row.format, row.variant, row.family = info.format, info.variant, info.family
        row.confidence, row.fitting_families = info.confidence, info.fitting_families
        row.adapter_type, row.modules, row.components, row.dtypes = info.adapter_type, info.num_modules, info.components, info.dtypes
        row.ranks = {str(k): v for k, v in info.ranks.items()}
        fam = get_registry().family(info.family)
        row.text_encoders = [c for c in info.components if c in fam.components and fam.components[c].role == "text_encoder"]
        row.ok = True
        if len(info.fitting_families) > 1 and info.confidence <= 0.5:
            others = [f for f in info.fitting_families if f != info.family]
            row.problems.append(f"ambiguous: ties with {', '.join(others)} (pass family= to choose)")
        if info.nonfinite:
            row.problems.append(f"nan: {len(info.nonfinite)} tensors hold NaN/Inf (e.g. {info.nonfinite[0]['name']})")
        if info.unmapped_keys:
            row.problems.append(f"unmapped: {len(info.unmapped_keys)} tensors map to no module (e.g. {next(iter(info.unmapped_keys))})")
        row.sha256, row.hashes, row.embedded_hashes = _hashes(info)
        for field, check in row.embedded_hashes.items():
            if check["ok"] is False:
                row.problems.append(f"embedded-hash: {field}={check['value']} does not match the file")
    except DetectionError as e:
        kind = "mixed" if "mixed key formats" in str(e) else "undetected"
        row.problems.append(f"{kind}: {_line(e)}")
        row.error = row.problems[-1]
    except LoraregError as e:
        row.problems.append(f"broken: {_line(e)}")
        row.error = row.problems[-1]
    except (OSError, ValueError, RuntimeError) as e:  # a file that breaks a reader is a row, not the end of the scan
        row.problems.append(f"broken: {e.__class__.__name__}: {_line(e)}")
        row.error = row.problems[-1]
    finally:
        row.seconds = round(time.perf_counter() - t0, 4)
    weights = path / PEFT_WEIGHTS if path.is_dir() else path
    if row.error and row.sha256 is None and weights.is_file():
        try:
            row.sha256 = _file_sha256(weights)
        except OSError:
            pass
    return row


def _line(e: BaseException) -> str:
    text = str(e)
    return text.splitlines()[0] if text else e.__class__.__name__


def _scan_chunk(refs: list[str]) -> list[dict]:
    return [scan_one(r).model_dump() for r in refs]


# -- which files ------------------------------------------------------------------------------------

def list_inputs(paths: Iterable[Union[str, Path]]) -> list[str]:
    """Files and PEFT folders under ``paths`` (folders recursively, list files line by line), Hub refs as given."""
    out: list[str] = []
    seen: set[str] = set()

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    for given in paths:
        p = Path(given)
        if p.is_dir():
            if (p / PEFT_CONFIG).exists():
                add(str(p))
                continue
            for root, dirs, files in os.walk(p):
                dirs.sort()
                keep = []
                for d in dirs:
                    if (Path(root) / d / PEFT_CONFIG).exists():
                        add(str(Path(root) / d))
                    elif not d.startswith("."):
                        keep.append(d)
                dirs[:] = keep
                for name in sorted(files):
                    if name.endswith(LORA_SUFFIXES + PICKLE_SUFFIXES) and not name.startswith("."):
                        add(str(Path(root) / name))
        elif p.is_file() and p.suffix in LIST_SUFFIXES:
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    add(line)
        elif p.exists():
            add(str(p))
        else:
            if not looks_like_hub_ref(str(given)):
                raise InputError(f"{given}: no such file or folder")
            add(str(given))
    return out


# -- the fingerprint cache ----------------------------------------------------------------------------

def fingerprint(ref: str) -> Optional[list[int]]:
    """(size, mtime_ns, inode) of a file, or of a PEFT folder's weights and config; None for Hub refs."""
    p = Path(ref)
    try:
        if p.is_dir():
            w, c = os.stat(p / PEFT_WEIGHTS), os.stat(p / PEFT_CONFIG)
            return [w.st_size, w.st_mtime_ns, w.st_ino, c.st_size, c.st_mtime_ns, c.st_ino]
        st = os.stat(p)
        return [st.st_size, st.st_mtime_ns, st.st_ino]
    except OSError:
        return None


def _cache_context() -> str:
    """What else a row depends on: the lorareg version and the registry's data roots."""
    return f"{__version__}|{os.pathsep.join(str(r) for r in data_roots())}"


def default_scan_cache() -> Path:
    return default_cache_root().parent / "scan-cache.json"


class ScanCache:
    """``{abs path: (fingerprint, row)}`` in one JSON file, rewritten atomically after a scan."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.context = _cache_context()
        self.entries: dict[str, dict] = {}
        if path is None:
            return
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(doc, dict) and doc.get("format") == CACHE_FORMAT and doc.get("context") == self.context:
            self.entries = doc.get("entries") or {}

    def get(self, ref: str, fp: Optional[list[int]]) -> Optional[ScanRow]:
        hit = self.entries.get(os.path.abspath(ref)) if fp is not None else None
        if hit is None or hit.get("fp") != fp:
            return None
        try:
            return ScanRow.model_validate({**hit["row"], "path": ref, "cached": True})
        except ValueError:
            return None

    def put(self, ref: str, fp: Optional[list[int]], row: dict) -> None:
        if fp is not None:
            self.entries[os.path.abspath(ref)] = {"fp": fp, "row": {k: v for k, v in row.items() if k not in ("path", "cached")}}

    def save(self) -> None:
        if self.path is None:
            return
        doc = {"format": CACHE_FORMAT, "context": self.context, "entries": self.entries}
        try:
            atomic_write_text(self.path, json.dumps(doc, separators=(",", ":")))
        except OSError:
            pass  # a read-only cache still works; it just scans again next time


# -- the scan ---------------------------------------------------------------------------------------

def scan(
    paths: Iterable[Union[str, Path]],
    *,
    workers: Optional[int] = None,
    cache: Union[str, Path, None, bool] = True,
    progress: bool = True,
    civitai: bool = False,
) -> ScanResult:
    """Scan files, folders (recursively), list files and Hub refs; one :class:`ScanRow` per LoRA.

    ``cache``: True for the default cache file (beside the basis cache), a path, or False/None for none.
    ``workers``: processes (default: the machine's cores); small scans run in this process.
    ``civitai``: also look each file up on Civitai by its hashes (one request or two per file, never cached).
    """
    t0 = time.perf_counter()
    refs = list_inputs(paths)
    cache_path = default_scan_cache() if cache is True else (Path(cache) if cache else None)
    store = ScanCache(cache_path)
    rows: dict[int, ScanRow] = {}
    todo: list[tuple[int, str, Optional[list[int]]]] = []
    for i, ref in enumerate(refs):
        fp = fingerprint(ref)
        hit = store.get(ref, fp)
        if hit is not None:
            rows[i] = hit
        else:
            todo.append((i, ref, fp))
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="scanning", unit="file", leave=False)
    try:
        for (i, ref, fp), row in zip(todo, _run(todo, workers, bar)):
            store.put(ref, fp, row)
            rows[i] = ScanRow.model_validate(row)
    finally:
        if bar is not None:
            bar.close()
        if todo:
            store.save()
    ordered = [rows[i] for i in range(len(refs)) if i in rows]
    if civitai:
        _look_up_on_civitai(ordered, progress)
    return ScanResult(rows=ordered, summary=summarize(ordered, time.perf_counter() - t0))


def _run(todo, workers: Optional[int], bar) -> Iterable[dict]:
    """Rows in the order of ``todo``, computed in chunks on a process pool (or here, for a few files)."""
    refs = [ref for _, ref, _ in todo]
    n = workers or default_workers()
    if n <= 1 or len(refs) <= 4:
        for ref in refs:
            row = scan_one(ref).model_dump()
            if bar is not None:
                bar.update(1)
            yield row
        return
    size = max(1, min(32, len(refs) // (n * 4)))
    chunks = [refs[i : i + size] for i in range(0, len(refs), size)]
    with process_pool(min(n, len(chunks))) as pool:
        for result in pool.map(_scan_chunk, chunks):
            if bar is not None:
                bar.update(len(result))
            yield from result


def summarize(rows: list[ScanRow], seconds: float) -> ScanSummary:
    problems: Counter[str] = Counter(p.split(":", 1)[0] for r in rows for p in r.problems)
    return ScanSummary(
        files=len(rows),
        ok=sum(r.ok for r in rows),
        failed=sum(not r.ok for r in rows),
        cached=sum(r.cached for r in rows),
        seconds=round(seconds, 3),
        by_family=dict(Counter(r.family or "-" for r in rows).most_common()),
        by_format=dict(Counter(r.format or "-" for r in rows).most_common()),
        problems=dict(problems.most_common()),
    )


CSV_FIELDS = ["path", "ok", "size", "format", "variant", "family", "confidence", "adapter_type", "ranks", "modules",
              "components", "text_encoders", "dtypes", "sha256", "hashes", "embedded_hashes", "problems", "error", "cached"]


def to_csv(rows: list[ScanRow]) -> str:
    """Rows as CSV (lists and dicts as JSON in their cell)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    for r in rows:
        d = r.model_dump()
        w.writerow([json.dumps(d[f], sort_keys=True) if isinstance(d[f], (list, dict)) else ("" if d[f] is None else d[f])
                    for f in CSV_FIELDS])
    return buf.getvalue()


def _look_up_on_civitai(rows: list[ScanRow], progress: bool) -> None:
    """Each readable file's Civitai version, from the driver (the API is the bound, not the CPU)."""
    todo = [r for r in rows if r.sha256]
    bar = progress_bar(len(todo), "civitai", progress, unit="file")
    for row in todo:
        matched_by, hit = lookup_hashes(row.sha256, row.hashes.get("autov3"))
        row.civitai = {} if hit is None else {"matched_by": matched_by, "version_id": hit.version_id, "model": hit.model_name,
                                              "version": hit.version_name, "creator": hit.creator, "page_url": hit.page_url}
        if bar:
            bar.update(1)
    if bar:
        bar.close()
