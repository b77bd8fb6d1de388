"""Plan a batch before any port runs: hash and detect every source, name every output, key every row,
group the rows by base-model pair and fill the basis cache for each base model once.

The sources are read through :func:`lorareg.library.scan.scan` (parallel, cached by file fingerprint), so a
re-planned batch over an unchanged library reads no LoRA again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..core.errors import LoraregError
from ..core.hash_memory import fingerprint
from ..port.bases import build_model_bases
from ..registry import get_registry
from ..sources.refs import looks_like_hub_ref
from .ledger import row_key
from .manifest import BatchRow, default_output
from .scan import ScanRow, scan

#: methods whose port reads no base weight: they need no warm bases
NO_BASES = ("copy",)


@dataclass
class Task:
    index: int
    row: BatchRow
    key: str
    output: str  # relative to OUTDIR
    sha256: Optional[str] = None
    family: Optional[str] = None
    error: Optional[str] = None  # known before running (unreadable source, a failed basis build)
    hashes: Optional[dict[str, Any]] = None  # the scan's hashes of the source and the file fingerprint they hold for

    def payload(self, outdir: Path, cache_dir: Optional[str], token: Optional[str], endpoint: Optional[str]) -> dict[str, Any]:
        """What a worker gets (see tasks.run_task)."""
        return {"key": self.key, "index": self.index, "lora": self.row.lora, "sha256": self.sha256,
                "family": self.family, "target": self.row.to or self.family, "output": self.output,
                "output_path": str(outdir / self.output), "row": self.row.model_dump(), "cache_dir": cache_dir,
                "token": token, "endpoint": endpoint, "command": f"lorareg batch (row {self.index})",
                "source_hashes": self.hashes}


@dataclass
class Group:
    """Rows sharing a base-model pair: their bases are built once, before their tasks."""

    source_family: str
    source_model: str
    target_family: str
    target_model: str
    rank_k: Optional[int]
    device: str
    components: set[str] = field(default_factory=set)
    tasks: list[Task] = field(default_factory=list)


def plan(rows: list[BatchRow], *, workers: Optional[int], progress: bool) -> tuple[list[Task], list[ScanRow]]:
    """A task per row, keyed, with its output name; unreadable sources become tasks with an error."""
    local = [r.lora for r in rows if Path(r.lora).exists()]
    before = {ref: fingerprint(Path(ref)) for ref in local}
    scanned = {s.path: s for s in scan(local, workers=workers, progress=progress).rows} if local else {}
    tasks: list[Task] = []
    for i, row in enumerate(rows):
        info = scanned.get(row.lora)
        sha = info.sha256 if info else None
        fam = info.family if info else None
        error = None
        if info is None and not Path(row.lora).exists():
            if not looks_like_hub_ref(row.lora):
                error = f"{row.lora}: no such file or folder"
        elif info is not None and not info.ok:
            error = info.error or "unreadable"
        output = row.output or default_output(row, fam)
        task = Task(i, row, row_key(sha, row.lora, {**row.options(), "output": output}), output, sha, fam, error)
        task.hashes = _known_hashes(info, before.get(row.lora))
        tasks.append(task)
    _dedupe_outputs(tasks)
    return tasks, list(scanned.values())


def _known_hashes(info: Optional[ScanRow], fp_before: Optional[str]) -> Optional[dict[str, Any]]:
    """The scan's hashes of a file for the port to reuse (it then reads the file once, not hashing it again):
    only when the file's fingerprint was the same before and after the scan, so that they are its bytes' hashes."""
    if info is None or not info.ok or not info.sha256 or fp_before is None or fingerprint(Path(info.path)) != fp_before:
        return None
    hashes = {"sha256": info.sha256, **info.hashes}
    if not {"autov2", "tensor_sha256", "autov3", "legacy"} <= hashes.keys():
        return None
    return {"fingerprint": fp_before, "hashes": hashes}


def _dedupe_outputs(tasks: list[Task]) -> None:
    """Two rows must not write one file: a defaulted name gets the source's AutoV2, an explicit one is an error."""
    seen: dict[str, Task] = {}
    for t in tasks:
        if t.error:
            continue
        other = seen.get(t.output)
        if other is not None and other.key != t.key:
            if t.row.output is None and t.sha256:
                p = Path(t.output)
                t.output = str(p.with_name(f"{p.stem}-{t.sha256[:10]}{p.suffix}"))
                t.key = row_key(t.sha256, t.row.lora, {**t.row.options(), "output": t.output})
            else:
                t.error = f"output {t.output} is also row {other.index}'s output"
                continue
        seen[t.output] = t


def groups(tasks: list[Task]) -> list[Group]:
    """Rows that need base weights, grouped by (source model, target model) and the basis options."""
    out: dict[tuple, Group] = {}
    reg = get_registry()
    for t in tasks:
        r = t.row
        if t.error or r.method in NO_BASES or not (r.source_model and r.target_model) or not t.family:
            continue
        try:
            tgt = reg.family(r.to).id if r.to else t.family
        except LoraregError:
            continue  # the task itself reports the unknown family
        key = (t.family, r.source_model, tgt, r.target_model, r.rank_k, r.device)
        g = out.setdefault(key, Group(*key))
        g.tasks.append(t)
    return list(out.values())


def warm(group: Group, components: dict[str, list[str]], cache_dir: Optional[str], progress: bool,
         build: Optional[Callable] = None, list_files: bool = False) -> dict:
    """Build (or find cached) the bases of both models of a group; raises on a model that cannot be read.
    ``list_files``: each side's stats also list the cache files holding its bases (to ship them to other nodes)."""
    build = build or build_model_bases
    reg = get_registry()
    src_comps = sorted({c for t in group.tasks for c in components.get(t.row.lora, [])}) or None
    tgt_fam = reg.family(group.target_family)
    tgt_comps = sorted(c for c in (src_comps or []) if c in tgt_fam.components) or None
    stats = {}
    for side, model, fam, comps in (("source", group.source_model, group.source_family, src_comps),
                                    ("target", group.target_model, group.target_family, tgt_comps)):
        stats[side] = build(model, fam, comps, None, group.rank_k, group.device, progress=progress, cache_dir=cache_dir,
                            list_files=list_files)
    return stats
