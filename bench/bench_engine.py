"""Benchmark of lorareg.engine on SDXL-sized layers.

Shapes: every attention linear weight of the SDXL UNet (to_q/to_k/to_v/to_out.0 of attn1 and attn2
in all 70 transformer blocks = 560 weights), read from schemas/modules/sdxl.json or, without it,
built from the diffusers UNet2DConditionModel SDXL config on the meta device. Weights are random
(Gaussian, seeded per layer); the "target" model is the source plus 20% noise. LoRA: rank 32 on all
these layers. k: lorareg.engine.default_k = min(320, min(m, n) // 4) unless --k.

  (a) cold basis build of both models: engine (batched, default settings) vs full torch.linalg.svd
      per layer (timed on --svd-sample layers per distinct shape and extrapolated by count);
  (b) warm port (bases read back from the on-disk cache, checksums verified) per method, each in
      a fresh subprocess, vs a reference that forms the dense ΔW and runs full SVDs per layer per
      port (timed on a sample per shape and extrapolated);
  (c) peak RSS (ru_maxrss) of each warm-port subprocess.

    python bench/bench_engine.py [--quick] [--device cpu|cuda] [--k K] [--rank 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lorareg.engine import (  # noqa: E402
    BASES_VERSION,
    BasisCache,
    BasisKey,
    default_k,
    get_method,
    top_k,
    top_k_batched,
    weight_digest,
)

ATTN = re.compile(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
PORT_METHODS = ["lora-x", "prolora", "prolora-full"]


# -- shapes ------------------------------------------------------------------------------------
def sdxl_attention_shapes() -> tuple[list[tuple[str, tuple[int, int]]], str]:
    p = ROOT / "schemas" / "modules" / "sdxl.json"
    if p.exists():
        try:
            mods = json.loads(p.read_text())["components"]["unet"]["modules"]
            out = [(k, (int(v[0]), int(v[1]))) for k, v in sorted(mods.items()) if ATTN.search(k)]
            if out:
                return out, str(p.relative_to(ROOT))
        except (KeyError, TypeError, ValueError, IndexError):
            pass
    from diffusers import UNet2DConditionModel

    cfg = dict(
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    out = [
        (n, (int(m.weight.shape[0]), int(m.weight.shape[1])))
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear) and ATTN.search(n)
    ]
    return sorted(out), "diffusers UNet2DConditionModel (SDXL config, meta device)"


def quick_subset(shapes):
    keep = ("down_blocks.1.attentions.0.transformer_blocks.0.",
            "down_blocks.2.attentions.0.transformer_blocks.0.",
            "mid_block.attentions.0.transformer_blocks.0.")
    return [s for s in shapes if s[0].startswith(keep)]


# -- synthetic weights -------------------------------------------------------------------------
def make_weight(name: str, shape, model: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    W = torch.randn(shape, generator=g) / shape[1] ** 0.5
    if model == "target":
        g2 = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 1)
        W += 0.2 * torch.randn(shape, generator=g2) / shape[1] ** 0.5
    return W


def make_lora(name: str, shape, rank: int):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7)
    return torch.randn(shape[0], rank, generator=g) * 0.01, torch.randn(rank, shape[1], generator=g) * 0.01


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# -- (a) cold build ----------------------------------------------------------------------------
def cold_build(shapes, model, cache, kfun, device, chunk=8):
    by_shape = defaultdict(list)
    for name, shape in shapes:
        by_shape[shape].append(name)
    keys, t_gen, t_hash, t_build, t_put = {}, 0.0, 0.0, 0.0, 0.0
    for shape, names in by_shape.items():
        k = kfun(shape)
        for i in range(0, len(names), chunk):
            part = names[i : i + chunk]
            t0 = time.perf_counter()
            ws = [make_weight(n, shape, model) for n in part]
            t1 = time.perf_counter()
            digests = [weight_digest(w) for w in ws]
            t2 = time.perf_counter()
            bases = top_k_batched(ws, k, device)
            sync(device)
            t3 = time.perf_counter()
            for n, d, b in zip(part, digests, bases):
                key = BasisKey(d, k)
                cache.put(key, b)
                keys[n] = [d, k]
            t4 = time.perf_counter()
            t_gen += t1 - t0; t_hash += t2 - t1; t_build += t3 - t2; t_put += t4 - t3
            del ws, bases
    return keys, dict(gen=t_gen, hash=t_hash, build=t_build, put=t_put)


def _median_time(fn, items, device, repeats=3):
    """Median over items × repeats of one call (robust to one-off stalls of a shared VM)."""
    fn(items[0]); sync(device)  # warm-up
    ts = []
    for _ in range(repeats):
        for x in items:
            t0 = time.perf_counter()
            fn(x)
            sync(device)
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def full_svd_sample(shapes, model, per_shape, kfun, device):
    by_shape = defaultdict(list)
    for name, shape in shapes:
        by_shape[shape].append(name)
    rows = []
    for shape, names in sorted(by_shape.items()):
        ws = [make_weight(n, shape, model).to(device) for n in names[:per_shape]]
        k = kfun(shape)
        t_full = _median_time(lambda w: torch.linalg.svd(w, full_matrices=False), ws, device)
        t_eng = _median_time(lambda w: top_k(w, k, device=device), ws, device)
        t_rand = _median_time(lambda w: top_k(w, k, device=device, method="randomized"), ws, device)
        rows.append(dict(shape=shape, count=len(names), k=k, full=t_full, engine=t_eng, randomized=t_rand))
    return rows


# -- (b) reference port: dense ΔW + full SVDs per layer per port --------------------------------
def reference_port(method, Ws, Wt, B, A, k, rank):
    dW = B @ A
    Ut, _, Vht = torch.linalg.svd(Wt, full_matrices=False)
    Ut, Vt = Ut[:, :k], Vht[:k].T
    Pt, Qt = Ut @ Ut.T, Vt @ Vt.T
    if method == "lora-x":
        out = Pt @ dW @ Qt
    else:
        Us, _, Vhs = torch.linalg.svd(Ws, full_matrices=False)
        Ps, Qs = Us[:, :k] @ Us[:, :k].T, Vhs[:k].T @ Vhs[:k]
        Im, In = torch.eye(dW.shape[0]), torch.eye(dW.shape[1])
        if method == "prolora":
            par = Ps @ dW @ Qs
            out = Pt @ par @ Qt + (Im - Pt) @ (dW - par) @ (In - Qt)
        else:
            out = (Pt @ Ps + (Im - Pt) @ (Im - Ps)) @ dW @ (Qs @ Qt + (In - Qs) @ (In - Qt))
    U, S, Vh = torch.linalg.svd(out, full_matrices=False)
    return U[:, :rank] * S[:rank].sqrt(), S[:rank].sqrt()[:, None] * Vh[:rank]


def reference_sample(shapes, per_shape, kfun, rank):
    by_shape = defaultdict(list)
    for name, shape in shapes:
        by_shape[shape].append(name)
    res = {}
    for method in PORT_METHODS:
        total = 0.0
        for shape, names in by_shape.items():
            items = []
            for n in names[:per_shape]:
                Ws, Wt = make_weight(n, shape, "source"), make_weight(n, shape, "target")
                items.append((Ws, Wt) + make_lora(n, shape, rank))
            k = kfun(shape)
            t = _median_time(lambda it: reference_port(method, *it, k, rank), items, "cpu", repeats=2)
            total += t * len(names)
        res[method] = total
    return res


# -- warm-port worker (runs in its own process) ------------------------------------------------
def worker(args) -> None:
    spec = json.loads(Path(args.worker_spec).read_text())
    device = torch.device(spec["device"])
    cache = BasisCache(Path(spec["cache"]))
    layers = spec["layers"]
    method = spec["method"]
    fn = get_method(method)
    loras = {n: make_lora(n, tuple(shape), spec["rank"]) for n, shape in layers}
    if device.type == "cuda":
        loras = {n: (B.to(device), A.to(device)) for n, (B, A) in loras.items()}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    needs_source = method != "lora-x"
    t_read = t_port = 0.0
    out = {}
    t_start = time.perf_counter()
    for n, _shape in layers:
        t0 = time.perf_counter()
        ds, k = spec["source_keys"][n]
        dt, _ = spec["target_keys"][n]
        src = cache.get(BasisKey(ds, k)) if needs_source else None
        tgt = cache.get(BasisKey(dt, k))
        if (needs_source and src is None) or tgt is None:
            raise SystemExit(f"cache miss for {n}")
        if device.type == "cuda":
            src = src.to(device) if src is not None else None
            tgt = tgt.to(device)
        t1 = time.perf_counter()
        B, A = loras[n]
        p = fn(B, A, source=src, target=tgt, rank=spec["rank"])
        out[n] = (p.up, p.down)
        sync(device)
        t2 = time.perf_counter()
        t_read += t1 - t0; t_port += t2 - t1
        del src, tgt, p
    total = time.perf_counter() - t_start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(method=method, total=total, read=t_read, port=t_port,
                          rss_mb=rss / 1024, rss_before_mb=rss_before / 1024,
                          hits=cache.hits, misses=cache.misses, corrupt=cache.corrupt)))


def run_worker(spec_path: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker-spec", str(spec_path),
           "--threads", str(torch.get_num_threads())]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def idle_rss_mb() -> float:
    code = ("import resource, torch, lorareg.engine; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return float(res.stdout.strip() or "nan")


# -- main --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 transformer blocks (24 layers), CI smoke")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--k", type=int, default=None, help="fixed k (default: default_k rule)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--svd-sample", type=int, default=2, help="layers per shape for full SVD / reference timing")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=2, help="warm-port runs per method (best is reported)")
    ap.add_argument("--cache-dir", default=None, help="basis cache root (default: a temp dir, removed)")
    ap.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker_spec:
        return worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")

    shapes, shape_src = sdxl_attention_shapes()
    if args.quick:
        shapes = quick_subset(shapes)
    kfun = (lambda s: args.k) if args.k else default_k
    device = torch.device(args.device)
    tmp = None
    root = Path(args.cache_dir) if args.cache_dir else Path(tmp := tempfile.mkdtemp(prefix="lorareg-bench-"))
    counts = defaultdict(int)
    for _, s in shapes:
        counts[s] += 1
    print(f"lorareg engine benchmark  torch {torch.__version__}  device {device}  "
          f"threads {torch.get_num_threads()}  cpus {os.cpu_count()}")
    print(f"layers: {len(shapes)} SDXL attention linears from {shape_src}; shapes "
          + ", ".join(f"{m}x{n}: {c} (k={kfun((m, n))})" for (m, n), c in sorted(counts.items()))
          + f"; LoRA rank {args.rank}; bases version {BASES_VERSION}")
    try:
        cache = BasisCache(root)
        # (a) cold build ----------------------------------------------------------------------
        keys, tim = {}, {}
        for model in ("source", "target"):
            keys[model], tim[model] = cold_build(shapes, model, cache, kfun, device)
        sample = full_svd_sample(shapes, "source", args.svd_sample, kfun, device)
        full_est = 2 * sum(r["full"] * r["count"] for r in sample)
        rand_est = 2 * sum(r["randomized"] * r["count"] for r in sample)
        build = tim["source"]["build"] + tim["target"]["build"]
        eng_est = 2 * sum(r["engine"] * r["count"] for r in sample)
        put = tim["source"]["put"] + tim["target"]["put"]
        hashing = tim["source"]["hash"] + tim["target"]["hash"]
        disk = sum(f.stat().st_size for f in root.rglob("*.safetensors")) / 2**30
        print("\n(a) cold basis build, both models "
              f"({2 * len(shapes)} weights), per-shape timings: median of {args.svd_sample} layers x 3 runs")
        print(f"  {'shape':>11} {'count':>5} {'k':>4} {'full SVD s':>10} {'engine s':>9} {'ratio':>6} {'forced-randomized s':>19} {'ratio':>6}")
        for r in sample:
            m, n = r["shape"]
            print(f"  {m:>5}x{n:<5} {r['count']:>5} {r['k']:>4} {r['full']:>10.3f} {r['engine']:>9.3f} "
                  f"{r['full'] / r['engine']:>5.1f}x {r['randomized']:>19.3f} {r['full'] / r['randomized']:>5.1f}x")
        print(f"  engine top_k_batched, all layers, measured : {build:8.2f} s   ({full_est / build:.1f}x vs full SVD)")
        print(f"  engine top_k, extrapolated from medians     : {eng_est:8.2f} s   ({full_est / eng_est:.1f}x vs full SVD)")
        print(f"  full torch.linalg.svd, extrapolated        : {full_est:8.2f} s")
        print(f"  forced randomized path, extrapolated        : {rand_est:8.2f} s")
        print(f"  + sha256 digests of the weights            : {hashing:8.2f} s  ({sum(4 * m * n * c for (m, n), c in counts.items()) * 2 / 2**30:.2f} GiB fp32)")
        print(f"  + cache writes                             : {put:8.2f} s  ({disk:.2f} GiB on disk)")

        # (b)+(c) warm port -----------------------------------------------------------------
        layers = [[n, list(s)] for n, s in shapes]
        ref = reference_sample(shapes, args.svd_sample, kfun, args.rank)
        print(f"\n(b) warm port of a rank-{args.rank} LoRA on {len(shapes)} layers (bases from the cache, "
              f"checksums verified; one fresh process per run)  (c) peak RSS")
        idle = idle_rss_mb()
        print(f"  {'method':>13} {'warm s':>7} {'(read':>7} {'+ math)':>8} {'reference s':>11} {'speed-up':>8} {'peak RSS MB':>11} {'RSS before loop':>15}")
        for method in PORT_METHODS:
            spec = dict(device=str(device), cache=str(root), layers=layers, method=method,
                        rank=args.rank, source_keys=keys["source"], target_keys=keys["target"])
            sp = root / f"spec-{method}.json"
            sp.write_text(json.dumps(spec))
            runs = [run_worker(sp) for _ in range(args.repeats)]
            w = min(runs, key=lambda x: x["total"])
            print(f"  {method:>13} {w['total']:>7.2f} {w['read']:>7.2f} {w['port']:>8.2f} {ref[method]:>11.1f} "
                  f"{ref[method] / w['total']:>7.0f}x {w['rss_mb']:>11.0f} {w['rss_before_mb']:>15.0f}")
        print(f"  (best of {args.repeats} runs per method; idle process: python + torch + lorareg.engine = {idle:.0f} MB RSS; reference = dense ΔW + full "
              f"SVD of each base weight + SVD of the result; median of {args.svd_sample} layers x 2 runs per shape, extrapolated)")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
