"""Whole-library throughput: `lorareg scan` (cold and re-scan) and `lorareg batch` (local pool, 1 and 2 workers, vs Ray).

    python bench/bench_batch.py [--scan-files 1000] [--sdxl 200] [--tiny 64] [--no-ray] [--keep DIR]

1. scan: a generated library of small LoRAs (tiny-sdxl attention, rank 4, kohya/diffusers alternating);
   files/s cold (fresh fingerprint cache) and re-scanned (cache warm).
2. batch, SDXL-shaped: rank-16 kohya/diffusers LoRAs on the 560 attention projections of the real SDXL UNet
   shapes (46 MB each), ported sdxl -> ssd-1b with --method copy (no base weights: the SDXL/SSD-1B weights are
   too large to synthesise on this machine), so the time is reading, pairing, writing.
3. batch, warm bases: rank-16 LoRAs on the test families' tiny SDXL-like UNet, ported to the SSD-like UNet
   (method auto: bases of both models, block alignment, projection) with the bases built once before the run.
Each batch runs on a local pool with 1 and 2 workers and on Ray (a local one-node instance, 2 CPUs);
Ray / local(2) is Ray's overhead. Time shares (read / math / write / push) are summed over the rows.
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


def _run_batch(rows, outdir: Path, cache: Path, *, workers: int, use_ray: bool) -> dict:
    import lorareg

    shutil.rmtree(outdir, ignore_errors=True)
    t0 = time.perf_counter()
    res = lorareg.batch(rows, outdir, workers=workers, ray=use_ray, cache_dir=cache, progress=False)
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
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--keep", type=Path, help="work folder (kept); default a temp folder, removed")
    args = ap.parse_args()

    os.environ["LORAREG_DATA_PATH"] = str(ROOT / "tests" / "data")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's local instance stays on 127.0.0.1
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # else Ray 2.60 writes a token to ~/.ray/auth_token
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["LORAREG_CACHE"] = str(work / "bases")
    import lorareg
    from batch_library import base_models, sdxl_loras

    print(f"machine: {os.cpu_count()} CPUs; work folder {work}")
    try:
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
            lib = work / "sdxllib"
            files = sorted(lib.glob("*.safetensors")) if lib.exists() else []
            if len(files) < args.sdxl:
                shutil.rmtree(lib, ignore_errors=True)
                files = _gen_sdxl(lib, args.sdxl)
            rows = [{"lora": str(p), "to": "ssd-1b", "method": "copy"} for p in files[: args.sdxl]]
            _bench_rows("SDXL-shaped r16, copy", rows, work, args.no_ray)
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
            _bench_rows("tiny models r16, auto", rows, work, args.no_ray)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def _bench_rows(name: str, rows, work: Path, no_ray: bool) -> None:
    cache = work / "bases"
    one = _run_batch(rows, work / "out", cache, workers=1, use_ray=False)
    print(_row(f"{name}: local, 1 worker", one, None), flush=True)
    two = _run_batch(rows, work / "out", cache, workers=2, use_ray=False)
    print(_row(f"{name}: local, 2 workers", two, one), flush=True)
    if not no_ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            print(f"| {name}: Ray | not installed | | | | | | |")
            return
        r = _run_batch(rows, work / "out", cache, workers=2, use_ray=True)
        print(_row(f"{name}: Ray, 1 node, 2 CPUs", r, one), flush=True)
        print(f"Ray overhead (run time, Ray / local 2 workers): {r['run'] / two['run']:.2f}x "
              f"(the Ray run includes starting a local Ray instance)", flush=True)


if __name__ == "__main__":
    main()
