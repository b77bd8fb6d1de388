"""`lorareg batch` / :func:`lorareg.batch`: plan, warm the bases, fan the rows out, record each result.

The driver (this process) plans, builds each base model's bases once, then hands the rows to workers:
a local process pool (default) or Ray (ray_runner.py). Every finished row is appended to the ledger by
the driver as it arrives, so an interrupted batch resumes where it stopped. A worker that dies (killed,
out of memory) costs only its rows: they are retried on a fresh pool, ``retries`` times.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from pydantic import BaseModel, Field

from ..core.errors import InputError, LoraregError
from ..engine.cache import default_cache_root
from .ledger import Ledger
from .manifest import BatchRow, make_row, read_manifest, rows_from_scan
from .plan import Task, groups, plan, warm
from .ray_runner import run_on_ray
from .tasks import PRIVATE, run_task
from .workers import default_workers, process_pool

PathLike = Union[str, Path]


class RowResult(BaseModel):
    index: int
    lora: str
    output: str
    status: str = Field(description="done (this run), skipped (done before, per the ledger) or failed")
    target: Optional[str] = None
    sha256: Optional[str] = None
    error: Optional[str] = None
    seconds: Optional[float] = None
    timings: dict[str, float] = Field(default_factory=dict)
    push: Optional[dict[str, Any]] = None
    node: Optional[str] = Field(None, description="Ray: the node that ran the row")
    bases: Optional[str] = Field(None, description="Ray, bases shipped: shared (the node saw the driver's cache), "
                                 "shipped (this row copied them into the node's cache) or node (found there)")


class BatchSummary(BaseModel):
    rows: int
    done: int
    skipped: int
    failed: int
    seconds: float
    plan_s: float
    warm_s: float
    run_s: float
    per_minute: Optional[float] = Field(None, description="rows ported per minute of the run phase")
    time_shares: dict[str, float] = Field(default_factory=dict, description="reading / math / writing / pushing, summed over rows")
    backend: str
    workers: int
    nodes: Optional[int] = Field(None, description="Ray: the cluster's alive nodes")
    bases_shipped: Optional[Union[str, list[str]]] = Field(
        None, description="Ray: the nodes that got the bases through the object store (\"all\" when forced)")
    errors: dict[str, int] = Field(default_factory=dict)


class BatchResult(BaseModel):
    outdir: str
    rows: list[RowResult]
    summary: BatchSummary

    @property
    def ok(self) -> bool:
        return self.summary.failed == 0


def batch(
    manifest: Union[PathLike, Iterable[Union[dict, BatchRow]], None] = None,
    outdir: PathLike = ".",
    *,
    from_scan: Optional[PathLike] = None,
    families: Iterable[str] = (),
    defaults: Optional[dict[str, Any]] = None,
    workers: Optional[int] = None,
    ray: bool = False,
    ray_address: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    ship_bases: Optional[bool] = None,
    retries: int = 2,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    progress: bool = True,
    on_record: Optional[Callable[[dict], None]] = None,
) -> BatchResult:
    """Port many LoRAs x targets into ``outdir``; resumable (ledger), failures isolated as rows.

    ``manifest``: a JSONL/CSV file, or rows (dicts with `lorareg port`'s option names); or ``from_scan``
    (a `lorareg scan --json` file, only ``families`` if given) with ``defaults`` (e.g. ``to``,
    ``source_model``) for every row. ``ray``/``ray_address`` run the rows on Ray instead of local
    processes. ``cache_dir`` is the basis cache; on Ray, a node that does not see it gets the bases through
    Ray's object store (``ship_bases``: None when needed, True always, False never). As with any process
    pool, a script that calls this must guard its top level with ``if __name__ == "__main__":``.
    """
    t_start = time.perf_counter()
    rows = _rows(manifest, from_scan, families, defaults)
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: not a folder")
    use_ray = ray or ray_address is not None
    n_workers = workers or default_workers()
    cache = str(Path(cache_dir).resolve()) if cache_dir else None
    if use_ray and cache is None:  # Ray tasks get the path explicitly: a node's own default may differ
        cache = str(default_cache_root().resolve())
    with Ledger(out) as ledger:
        tasks, scanned = plan(rows, workers=n_workers, progress=progress)
        state = ledger.state()
        results: dict[int, RowResult] = {}
        pending: list[Task] = []
        for t in tasks:
            rec = state.get(t.key)
            if rec is not None and rec.get("status") == "done" and (out / t.output).exists():
                results[t.index] = _result(t, rec, "skipped")
            elif t.error:
                _finish(ledger, t, {"key": t.key, "index": t.index, "lora": t.row.lora, "sha256": t.sha256,
                                    "output": t.output, "status": "failed", "error": t.error}, results, on_record)
            else:
                pending.append(t)
        plan_s = time.perf_counter() - t_start

        t0 = time.perf_counter()
        components = {s.path: s.components for s in scanned}
        bundles: list[tuple[list[str], list[int]]] = []  # per base-model pair: its cache files, its rows
        for g in groups(pending):
            try:
                stats = warm(g, components, cache, progress, list_files=use_ray)
                bundles.append((sorted({f for side in stats.values() for f in side.get("files", [])}), [t.index for t in g.tasks]))
            except (LoraregError, OSError) as e:  # a model that cannot be read fails its rows, not the batch
                reason = f"base models: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}"
                for t in g.tasks:
                    t.error = reason
        for t in [t for t in pending if t.error]:
            _finish(ledger, t, {"key": t.key, "index": t.index, "lora": t.row.lora, "sha256": t.sha256,
                                "output": t.output, "status": "failed", "error": t.error}, results, on_record)
        pending = [t for t in pending if not t.error]
        warm_s = time.perf_counter() - t0

        t1 = time.perf_counter()
        payloads = [t.payload(out, cache, token, endpoint) for t in pending]
        by_index = {t.index: t for t in pending}
        record = lambda rec: _finish(ledger, by_index[rec["index"]], rec, results, on_record)  # noqa: E731
        bar = _bar(len(payloads), progress)
        cluster: dict = {}
        try:
            if not payloads:
                pass
            elif use_ray:
                cluster = run_on_ray(payloads, record, address=ray_address, retries=retries, bar=bar, cache_dir=cache,
                                     bundles=bundles, ship=ship_bases)
            else:
                run_local(payloads, record, workers=min(n_workers, len(payloads)), retries=retries, bar=bar)
        finally:
            if bar is not None:
                bar.close()
        run_s = time.perf_counter() - t1

    ordered = [results[i] for i in sorted(results)]
    return BatchResult(outdir=str(out), rows=ordered,
                       summary=_summary(ordered, time.perf_counter() - t_start, plan_s, warm_s, run_s,
                                        "ray" if use_ray else "local", n_workers, cluster))


def _rows(manifest, from_scan, families, defaults) -> list[BatchRow]:
    if from_scan is not None:
        if manifest is not None:
            raise InputError("give a manifest or --from-scan, not both")
        return rows_from_scan(from_scan, defaults, families)
    if manifest is None:
        raise InputError("no manifest given")
    if isinstance(manifest, (str, Path)):
        return read_manifest(manifest, defaults)
    rows = [r if isinstance(r, BatchRow) else make_row(r, defaults, f"row {i}") for i, r in enumerate(manifest)]
    if not rows:
        raise InputError("the manifest has no rows")
    return rows


def _finish(ledger: Ledger, task: Task, rec: dict, results: dict[int, RowResult], on_record) -> None:
    ledger.append(rec)
    results[task.index] = _result(task, rec, rec["status"])
    if on_record is not None:
        on_record(rec)


def _result(task: Task, rec: dict, status: str) -> RowResult:
    return RowResult(index=task.index, lora=task.row.lora, output=task.output, status=status,
                     target=rec.get("target"), sha256=task.sha256, error=rec.get("error"), seconds=rec.get("seconds"),
                     timings=rec.get("timings") or {}, push=rec.get("push"),
                     node=rec.get("node"), bases=rec.get("bases"))


def _bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="porting", unit="lora")


def run_local(payloads: list[dict], record: Callable[[dict], None], *, workers: int, retries: int, bar=None) -> None:
    """Run the tasks on a process pool; a pool broken by a dead worker is replaced and its tasks retried."""
    attempts: Counter[int] = Counter()
    todo = list(payloads)
    while todo:
        lost: list[dict] = []
        pool = process_pool(max(1, min(workers, len(todo))))
        try:
            futures = {pool.submit(run_task, p): p for p in todo}
            waiting = set(futures)
            while waiting:
                finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                for f in finished:
                    p = futures[f]
                    try:
                        rec = f.result()
                    except BrokenProcessPool:
                        lost.append(p)
                        continue
                    record(rec)
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        todo = []
        for p in lost:
            attempts[p["index"]] += 1
            if attempts[p["index"]] > retries:
                rec = {k: v for k, v in p.items() if k not in PRIVATE}
                rec.update(status="failed", error=f"worker died {attempts[p['index']]} times on this row (killed or out of memory)")
                record(rec)
                if bar is not None:
                    bar.update(1)
            else:
                todo.append(p)


def _summary(rows: list[RowResult], seconds: float, plan_s: float, warm_s: float, run_s: float, backend: str, workers: int,
             cluster: dict) -> BatchSummary:
    done = [r for r in rows if r.status == "done"]
    shares: Counter[str] = Counter()
    for r in done:
        for k in ("read_s", "math_s", "write_s", "push_s"):
            shares[k] += r.timings.get(k, 0.0)
    total = sum(shares.values())
    return BatchSummary(
        rows=len(rows), done=len(done), skipped=sum(r.status == "skipped" for r in rows),
        failed=sum(r.status == "failed" for r in rows), seconds=round(seconds, 3), plan_s=round(plan_s, 3),
        warm_s=round(warm_s, 3), run_s=round(run_s, 3),
        per_minute=round(60 * len(done) / run_s, 2) if done and run_s > 0 else None,
        time_shares={k.removesuffix("_s"): round(v / total, 4) for k, v in shares.items()} if total > 0 else {},
        backend=backend, workers=workers, nodes=cluster.get("nodes"), bases_shipped=cluster.get("shipped") or None,
        errors=dict(Counter((r.error or "").split(":", 1)[0] for r in rows if r.status == "failed").most_common()),
    )


def summary_table(result: BatchResult, limit: int = 40) -> str:
    """The human summary: one line per row that did something, then the totals."""
    s = result.summary
    lines = []
    shown = [r for r in result.rows if r.status != "skipped"]
    for r in shown[:limit]:
        what = r.error if r.status == "failed" else (r.output + (f" -> {r.push['repo_id']}" if r.push else ""))
        lines.append(f"  {r.status:<7} {Path(r.lora).name:<40} {what}")
    if len(shown) > limit:
        lines.append(f"  ... {len(shown) - limit} more rows (see --json or {result.outdir}/ledger.jsonl)")
    rate = f", {s.per_minute:.1f} LoRAs/min" if s.per_minute else ""
    lines.append(f"{s.rows} rows: {s.done} done, {s.skipped} already done, {s.failed} failed "
                 f"({s.backend}, {f'{s.nodes} nodes' if s.nodes else f'{s.workers} workers'}; plan {s.plan_s:.1f} s, bases {s.warm_s:.1f} s, run {s.run_s:.1f} s{rate})")
    if s.bases_shipped:
        to = "every node" if s.bases_shipped == "all" else f"{len(s.bases_shipped)} node(s) not seeing the cache"
        lines.append(f"  bases sent through Ray's object store to {to}")
    if s.time_shares:
        lines.append("  time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s.time_shares.items()))
    return "\n".join(lines)
