"""Whole-library throughput: `lorareg scan` (cold and re-scan) and `lorareg batch` (local pool, 1 and 2 workers, vs Ray
on one node and on a head + worker node), and what the port saves by reusing the plan's hashes.

    python bench/bench_batch.py [--scan-files 1000] [--sdxl 200] [--tiny 64] [--reuse 10] [--no-ray] [--keep DIR]

1. scan: a generated library of small LoRAs (tiny-sdxl attention, rank 4, kohya/diffusers alternating);
   files/s cold (fresh fingerprint cache) and re-scanned (cache warm).
2. batch, SDXL-shaped: rank-16 kohya/diffusers LoRAs on the 560 attention projections of the real SDXL UNet
   shapes (46 MB each), ported sdxl -> ssd-1b with --method copy (no base weights: the SDXL/SSD-1B weights are
   too large to synthesise on this machine), so the time is reading, pairing, writing.
3. batch, warm bases: rank-16 LoRAs on the test families' tiny SDXL-like UNet, ported to the SSD-like UNet
   (method auto: bases of both models, block alignment, projection) with the bases built once before the run.
Each batch runs on a local pool with 1 and 2 workers and on two Ray clusters started here on 127.0.0.1 (as
tests/ray_cluster.py does): one node with 2 CPUs, and a head + a worker node with 1 CPU each (two raylets and
object stores on this machine: the cost of a second node, not more cores); tiny rows also with the bases
shipped through the object store to every node (--ship-bases). The clusters start before the timed batch.
Time shares (read / math / write / push) are summed over the rows.
4. read once: the port of one SDXL-shaped row in this process, with the plan's hashes of the source handed
   over (what `lorareg batch` does) and without (the port hashes the file again), fresh file fingerprints each.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _sdxl_library(work: Path, n: int) -> list[Path]:
    """At least ``n`` SDXL-shaped LoRAs in work/sdxllib, made once and reused by later runs."""
    lib = work / "sdxllib"
    files = sorted(lib.glob("*.safetensors")) if lib.exists() else []
    if len(files) < n:
        shutil.rmtree(lib, ignore_errors=True)
        files = _gen_sdxl(lib, n)
    return files


def _gen_sdxl(folder: Path, n: int) -> list[Path]:
    import torch

    import lorareg
    from lorareg.core.io import LazyTensor
    from lora_factory import make_lora

    folder.mkdir(parents=True, exist_ok=True)
    base = make_lora("sdxl", r"attn[12]\.to_(q|k|v|out\.0)$", rank=16, alpha=16.0, dtype=torch.float16, seed=0)
    out = []
    for i in range(n):
        fmt = "kohya" if i % 2 == 0 else "diffusers"
        path = folder / f"sdxl{i:04d}-{fmt}.safetensors"
        # distinct files (distinct SHA-256), same shapes: one random tensor per file differs
        lora = base
        first = next(iter(lora.modules.values()))
        first.factors["down"] = LazyTensor.from_torch(torch.randn(first.factors["down"].torch().shape, dtype=torch.float16))
        lorareg.save(lora, path, format=fmt)
        out.append(path)
    return out


def _run_batch(rows, outdir: Path, cache: Path, *, workers: int, ray_address=None, ship=None) -> dict:
    import lorareg

    shutil.rmtree(outdir, ignore_errors=True)
    t0 = time.perf_counter()
    res = lorareg.batch(rows, outdir, workers=workers, ray_address=ray_address, cache_dir=cache, ship_bases=ship, progress=False)
    wall = time.perf_counter() - t0
    s = res.summary
    assert s.failed == 0, [r.error for r in res.rows if r.error][:3]
    return {"wall": wall, "run": s.run_s, "plan": s.plan_s, "warm": s.warm_s, "per_min": 60 * s.done / s.run_s,
            "shares": s.time_shares, "done": s.done}


def _row(label: str, r: dict, ref: dict | None) -> str:
    shares = " / ".join(f"{100 * r['shares'].get(k, 0):.0f}" for k in ("read", "math", "write", "push"))
    ratio = f"{r['run'] / ref['run']:.2f}x" if ref else "-"
    return (f"| {label} | {r['done']} | {r['plan']:.1f} | {r['warm']:.1f} | {r['run']:.1f} | {r['per_min']:.0f} | {ratio} | {shares} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scan-files", type=int, default=1000)
    ap.add_argument("--sdxl", type=int, default=200)
    ap.add_argument("--tiny", type=int, default=64)
    ap.add_argument("--reuse", type=int, default=10, help="SDXL-shaped rows for the read-once comparison (0: skip)")
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--keep", type=Path, help="work folder (kept); default a temp folder, removed")
    args = ap.parse_args()

    os.environ["LORAREG_DATA_PATH"] = str(ROOT / "tests" / "data")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # this driver keeps 127.0.0.1 as given (read at Ray's import)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray 2.60 writes a token to ~/.ray/auth_token
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LORAREG_CACHE"] = str(work / "bases")
    import lorareg
    from batch_library import base_models, sdxl_loras

    print(f"machine: {os.cpu_count()} CPUs; work folder {work}")
    started: list = []
    try:
        clusters: dict = {}
        if not args.no_ray and (args.sdxl or args.tiny):
            try:
                import ray  # noqa: F401
            except ImportError:
                print("Ray is not installed: no Ray rows")
            else:
                clusters, started = _start_clusters(work)
        # 1. scan
        if args.scan_files:
            lib = work / "scanlib"
            files = sorted(lib.glob("**/*.safetensors")) if lib.exists() else []
            if len(files) < args.scan_files:
                t0 = time.perf_counter()
                sdxl_loras(lib, args.scan_files - len(files), start=len(files))
                print(f"generated {args.scan_files} tiny LoRAs in {time.perf_counter() - t0:.1f} s")
            size = sum(p.stat().st_size for p in lib.glob("**/*.safetensors")) / 2**20
            cache = work / "scan-cache.json"
            cache.unlink(missing_ok=True)
            for label in ("cold", "re-scan"):
                t0 = time.perf_counter()
                res = lorareg.scan([lib], workers=2, cache=cache, progress=False)
                dt = time.perf_counter() - t0
                print(f"scan {label:8s}: {res.summary.files} files ({size:.0f} MiB), {res.summary.cached} cached, "
                      f"{dt:.2f} s = {res.summary.files / dt:.0f} files/s")

        print("\n| batch | rows | plan s | bases s | run s | LoRAs/min | run vs local-1 | read / math / write / push % |")
        print("|---|---:|---:|---:|---:|---:|---:|---|")
        # 2. SDXL-shaped, copy
        if args.sdxl:
            files = _sdxl_library(work, args.sdxl)
            rows = [{"lora": str(p), "to": "ssd-1b", "method": "copy"} for p in files[: args.sdxl]]
            _bench_rows("SDXL-shaped r16, copy", rows, work, clusters)
        # 3. tiny models, warm bases
        if args.tiny:
            models = work / "models"
            if not (models / "ssd").exists():
                base_models(models)
            lib = work / "tinylib"
            files = sorted(lib.glob("*.safetensors")) if lib.exists() else []
            if len(files) < args.tiny:
                files = sdxl_loras(lib, args.tiny - len(files), rank=16, start=len(files))
                files = sorted(lib.glob("*.safetensors"))
            rows = [{"lora": str(p), "to": "tiny-ssd", "source_model": str(models / "sdxl"), "target_model": str(models / "ssd")}
                    for p in files[: args.tiny]]
            _bench_rows("tiny models r16, auto", rows, work, clusters, ship=True)
        for c in started:  # idle clusters still cost CPU: stopped before the in-process timing
            c.stop()
        started = []
        # 4. read once
        if args.reuse:
            _bench_reuse(_sdxl_library(work, args.reuse)[: args.reuse], work)
    finally:
        for c in started:
            c.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _bench_rows(name: str, rows, work: Path, clusters: dict, ship: bool = False) -> None:
    cache = work / "bases"
    one = _run_batch(rows, work / "out", cache, workers=1)
    print(_row(f"{name}: local, 1 worker", one, None), flush=True)
    two = _run_batch(rows, work / "out", cache, workers=2)
    print(_row(f"{name}: local, 2 workers", two, one), flush=True)
    for label, address in clusters.items():
        r = _run_batch(rows, work / "out", cache, workers=2, ray_address=address)
        print(_row(f"{name}: Ray, {label}", r, one), flush=True)
        print(f"  Ray {label} / local 2 workers, run time: {r['run'] / two['run']:.2f}x", flush=True)
        if ship:
            r = _run_batch(rows, work / "out", cache, workers=2, ray_address=address, ship=True)
            print(_row(f"{name}: Ray, {label}, bases shipped", r, one), flush=True)


def _start_clusters(work: Path) -> tuple[dict, list]:
    """A one-node (2 CPUs) and a two-node (1 + 1 CPU) Ray cluster on 127.0.0.1, each node with its own cache."""
    from ray_cluster import LocalRayCluster

    import ray

    out, started = {}, []
    for label, cpus in (("1 node, 2 CPUs", [2]), ("head + worker node, 1 CPU each", [1, 1])):
        logs = work / f"ray-{len(started)}"
        logs.mkdir(exist_ok=True)
        c = LocalRayCluster(logs)
        started.append(c)
        t0 = time.perf_counter()
        c.start_head(num_cpus=cpus[0], env={"LORAREG_CACHE": str(logs / "head-cache")})
        for i, n in enumerate(cpus[1:]):
            c.add_node(num_cpus=n, env={"LORAREG_CACHE": str(logs / f"node{i}-cache")})
        ray.init(address=c.address, log_to_driver=False)
        try:
            nodes = c.alive_nodes(ray, len(cpus))
            addresses = {n["NodeManagerAddress"] for n in nodes}
        finally:
            ray.shutdown()
        assert addresses == {"127.0.0.1"}, addresses
        print(f"Ray cluster '{label}' up in {time.perf_counter() - t0:.1f} s", flush=True)
        out[label] = c.address
    return out, started


def _bench_reuse(files: list[Path], work: Path) -> None:
    """One SDXL-shaped row ported in this process: with the plan's hashes handed over, and without."""
    from lorareg.library.manifest import make_row
    from lorareg.library.plan import plan
    from lorareg.library.tasks import run_task

    n = len(files)
    times: dict[str, list[float]] = {"plan": [], "reuse": [], "hash again": []}
    reads: dict[str, list[float]] = {"reuse": [], "hash again": []}
    cpu: dict[str, list[float]] = {"reuse": [], "hash again": []}  # this process's CPU time, all threads
    for i, f in enumerate([files[0], *files]):  # the first, untimed: imports and registry
        for variant in (("reuse", "hash again") if i % 2 else ("hash again", "reuse")):  # alternate the order
            src = work / "reuse" / f"{variant.replace(' ', '-')}-{i}.safetensors"
            src.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, src)  # a fresh fingerprint: nothing remembered from an earlier run
            os.environ["LORAREG_CACHE"] = str(work / "reuse" / f"cache-{variant.replace(' ', '-')}-{i}")
            rows = [make_row({"lora": str(src), "to": "ssd-1b", "method": "copy"}, None, "row 0")]
            t0 = time.perf_counter()
            tasks, _ = plan(rows, workers=1, progress=False)
            if i:
                times["plan"].append(time.perf_counter() - t0)
            payload = tasks[0].payload(work / "reuse" / "out", None, None, None)
            if variant == "hash again":
                payload["source_hashes"] = None
            t0, c0 = time.perf_counter(), time.process_time()
            rec = run_task(payload)
            assert rec["status"] == "done", rec.get("error")
            if i:
                times[variant].append(time.perf_counter() - t0)
                cpu[variant].append(time.process_time() - c0)
                reads[variant].append(rec["timings"]["read_s"])
    os.environ["LORAREG_CACHE"] = str(work / "bases")
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    size = files[0].stat().st_size / 2**20
    print(f"\nread once: {n} SDXL-shaped rows ({size:.0f} MiB each), one process, medians:")
    print(f"  plan (scan: hashes + detection + NaN check)  {med(times['plan']):.3f} s")
    for v in ("hash again", "reuse"):
        print(f"  port, {v:<10}: {med(times[v]):.3f} s wall, {med(cpu[v]):.3f} s CPU (read share {med(reads[v]):.3f} s)")
    print(f"  port with the plan's hashes / hashing again: {med(times['reuse']) / med(times['hash again']):.2f}x; "
          f"plan + port: {(med(times['plan']) + med(times['reuse'])) / (med(times['plan']) + med(times['hash again'])):.2f}x; "
          f"port CPU: {med(cpu['reuse']) / med(cpu['hash again']):.2f}x", flush=True)


if __name__ == "__main__":
    main()
