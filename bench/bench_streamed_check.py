"""Benchmark of the streamed relatedness check (lorareg.engine.relatedness) on HunyuanVideo-shaped shards.

Models: the first --double double-stream blocks and --single single-stream blocks of HunyuanVideo's
transformer (real shapes: schemas/modules/hunyuan-video.json, width 3072), plus every module outside
the blocks (embedders, token refiner, output), random bf16 weights written as a diffusers folder
(transformer/ with multi-shard safetensors and an index). Target = source + 1% noise (a fine-tune).
The full model is 20 + 40 blocks (12.8 B linear parameters, 25.6 GB in bf16 per model); the default
2 + 4 blocks is 1.6 B parameters, 3.2 GB per model, 6.4 GB for the pair.

Each measurement runs in a fresh subprocess (peak RSS = its ru_maxrss), on a cold page cache
(every shard evicted with posix_fadvise DONTNEED first) and then warm:
  bare      safetensors safe_open + get_tensor(...).clone() of every tensor of both models (the same bytes)
  raw       os.preadv of every tensor's bytes into one 64 MiB buffer (the I/O floor)
  streamed  the check a copy port runs: BaseWeights.stored + check_pairs over every module pair
  no-prefetch  the same without reading the next chunk in a background thread
  port      `lorareg.port --method copy` end to end (rank-4 LoRA on every linear inside a block, refiner blocks included; not written)
  mmap      BaseWeights.weight(...).float() of every module (the bases path's reader), for its RSS
and, in-process on --bases-layers layers, the bases path per layer (read both weights, top-k bases
with default k, subspace similarity) against the streamed check of the same layers.

    python bench/bench_streamed_check.py                      # default: 6.4 GB in a temp dir, deleted after
    python bench/bench_streamed_check.py --tiny               # CI size: q/k/v of one block, 0.11 GB
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILY = "hunyuan-video"
COMPONENT = "transformer"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


def modules(double: int, single: int, only: str = "") -> dict[str, tuple[int, ...]]:
    """The chosen blocks' modules and everything outside the blocks, with their real shapes
    (``only``: those whose name matches this regular expression)."""
    from lorareg.registry import get_registry

    table = get_registry().family(FAMILY).components[COMPONENT].modules
    out = {}
    for name, shape in table.items():
        m = re.match(r"(single_)?transformer_blocks\.(\d+)\.", name)
        if m and int(m.group(2)) >= (single if m.group(1) else double):
            continue
        if only and not re.search(only, name):
            continue
        out[name] = tuple(shape)
    return out


def write_models(root: Path, table: dict[str, tuple[int, ...]], shard_bytes: int, noise: float) -> list[Path]:
    """source/ and target/ diffusers folders; returns every shard written."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    files = []
    dirs = {side: root / side / COMPONENT for side in ("source", "target")}
    for d in dirs.values():
        d.mkdir(parents=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in table.items():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    maps = {side: {} for side in dirs}
    for j, names in enumerate(shards):
        fname = f"diffusion_pytorch_model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        src, tgt = {}, {}
        for name in names:
            w = torch.randn(table[name], generator=g) * 0.02
            src[name + ".weight"] = w.bfloat16()
            tgt[name + ".weight"] = (w + noise * 0.02 * torch.randn(w.shape, generator=g)).bfloat16()
            del w
        for side, tensors in (("source", src), ("target", tgt)):
            path = dirs[side] / fname
            save_file(tensors, path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files.append(path)
            maps[side].update({k: fname for k in tensors})
        del src, tgt
    for side, d in dirs.items():
        (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": maps[side]}))
    return files


def evict(files: list[Path]) -> None:
    """Drop the files' pages from the page cache (no root needed for clean pages)."""
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def status_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries it over fork + exec,
    so a child would report its parent's peak (the weight generation) if that was higher."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- measurements (each in its own process) ------------------------------------------------------
def _open(root: Path):
    from lorareg.registry import get_registry
    from lorareg.sources.weights import open_model

    fam = get_registry().family(FAMILY)
    return fam, open_model(fam, str(root / "source")), open_model(fam, str(root / "target"))


def measure(kind: str, root: Path, table: dict[str, tuple[int, ...]]) -> dict:
    base_kb = status_kb("VmRSS")
    t0 = time.perf_counter()
    extra: dict = {}
    if kind == "bare":
        from safetensors import safe_open

        nbytes = 0
        for side in ("source", "target"):
            for shard in sorted((root / side / COMPONENT).glob("*.safetensors")):
                with safe_open(str(shard), framework="pt") as f:
                    for key in f.keys():
                        # get_tensor maps the file without touching it: clone() reads the bytes into memory
                        t = f.get_tensor(key).clone()
                        nbytes += t.numel() * t.element_size()
                        del t
    elif kind == "raw":
        from lorareg.core.io import read_header

        nbytes = 0
        buf = bytearray(64 * 2**20)
        for side in ("source", "target"):
            for shard in sorted((root / side / COMPONENT).glob("*.safetensors")):
                h = read_header(shard)
                fd = os.open(shard, os.O_RDONLY)
                try:
                    for info in h.tensors.values():
                        pos, end = h.data_offset + info.begin, h.data_offset + info.end
                        while pos < end:
                            n = os.preadv(fd, [memoryview(buf)[: min(len(buf), end - pos)]], pos)
                            pos += n
                            nbytes += n
                finally:
                    os.close(fd)
    elif kind in ("streamed", "no-prefetch"):
        from lorareg.engine.relatedness import WeightPair, check_pairs

        _, src, tgt = _open(root)
        pairs = [WeightPair(n, src.stored(COMPONENT, n), tgt.stored(COMPONENT, n)) for n in table]
        res = check_pairs(pairs, prefetch=kind == "streamed")
        nbytes = res.bytes_read
        extra = {"open_s": time.perf_counter() - t0 - res.seconds, "check_s": res.seconds,"mean_cosine": res.mean_cosine, "min_cosine": res.min_cosine, "mean_relative_distance": res.mean_relative_distance,
                 "related": res.related, "max_chunk_elems": res.max_chunk_elems, "layers": len(res.layers)}
    elif kind == "port":
        import lorareg
        from lorareg.core.io import LazyTensor
        from lorareg.core.lora import Lora, Module

        g = torch.Generator().manual_seed(1)
        mods = {}
        for name, shape in table.items():
            if "blocks." not in name:
                continue
            down = LazyTensor.from_torch((torch.randn(4, shape[1], generator=g) * 0.01).bfloat16())
            up = LazyTensor.from_torch((torch.randn(shape[0], 4, generator=g) * 0.01).bfloat16())
            mods[f"{COMPONENT}:{name}"] = Module(COMPONENT, name, "lora", {"down": down, "up": up}, 4.0, None, shape, [])
        res = lorareg.port(Lora(FAMILY, mods), source_model=str(root / "source"), target_model=str(root / "target"), method="copy",
                           progress=False, cache_dir=root / "cache")
        rep = res.report
        nbytes = rep.check["bytes_read"]
        extra = {"layers": rep.totals.layers, "ported": rep.totals.ported, "check": rep.check["kind"], "built": rep.cache["built"],
                 "mean_cosine": rep.totals.mean_cosine, "related": rep.totals.related}
    elif kind == "mmap":
        _, src, tgt = _open(root)
        nbytes = 0
        for model in (src, tgt):
            for n in table:
                w = model.weight(COMPONENT, n)
                nbytes += w.numel() * w.element_size()
                float(w.float().sum())
                del w
    else:
        raise SystemExit(f"unknown measurement {kind}")
    secs = time.perf_counter() - t0
    peak = status_kb("VmHWM")
    return {"kind": kind, "seconds": secs, "bytes": nbytes, "s_per_gb": secs / (nbytes / 1e9), "peak_rss_mb": peak / 1024,
            "rss_before_mb": base_kb / 1024, "peak_above_start_mb": (peak - base_kb) / 1024, **extra}


def bases_vs_streamed(root: Path, table: dict[str, tuple[int, ...]], layers: int) -> list[dict]:
    """Per layer: the bases path (read both weights, top-k bases of each, similarity) vs the streamed check."""
    from lorareg.engine import default_k, subspace_similarity, top_k
    from lorareg.engine.relatedness import WeightPair, check_pairs

    _, src, tgt = _open(root)
    big = sorted((n for n in table if "blocks." in n), key=lambda n: -math.prod(table[n]))
    names, seen = [], set()
    for n in big:  # one layer of each block shape, largest first
        if table[n] not in seen:
            seen.add(table[n])
            names.append(n)
    rows = []
    for n in names[:layers]:
        t0 = time.perf_counter()
        ws = src.weight(COMPONENT, n).reshape(table[n][0], -1)
        wt = tgt.weight(COMPONENT, n).reshape(table[n][0], -1)
        k = default_k(ws.shape)
        bs, bt = top_k(ws, k), top_k(wt, k)
        sim = min(subspace_similarity(bs.U, bt.U), subspace_similarity(bs.V, bt.V))
        t_bases = time.perf_counter() - t0
        del ws, wt, bs, bt
        t0 = time.perf_counter()
        res = check_pairs([WeightPair(n, src.stored(COMPONENT, n), tgt.stored(COMPONENT, n))])
        t_streamed = time.perf_counter() - t0
        rows.append({"layer": n, "shape": list(table[n]), "k": k, "bases_s": t_bases, "streamed_s": t_streamed,
                     "ratio": t_bases / t_streamed, "similarity": sim, "cosine": res.layers[0].cosine})
    return rows


def fidelity_pairs(work: Path) -> list[dict]:
    """The streamed check's cosine and distance on bench/fidelity's trained pairs (the threshold's evidence).

    ``work``: a `bench/fidelity/run.py --work W` folder. Layers are paired as a port pairs them (a bases
    port first: the distilled UNet's blocks are re-paired by similarity), then compared streamed.
    """
    import lorareg
    from lorareg.engine.relatedness import WeightPair, check_pairs
    from lorareg.registry import get_registry
    from lorareg.sources.weights import open_model

    os.environ["LORAREG_DATA_PATH"] = os.pathsep.join([str(ROOT / "bench" / "fidelity" / "data"), os.environ.get("LORAREG_DATA_PATH", "")])
    cache = Path(tempfile.mkdtemp(prefix="lorareg-fid-cache-"))
    cases = [("lm", "lora-v1", "fid-llama", t, k) for t, k in (("v2", "checkpoint upgrade"), ("v4", "far continuation"),
                                                                ("v3", "negative control (another seed)"))]
    cases += [("diffusion", "lora-v1.safetensors", "fid-unet", "v2", "checkpoint upgrade"),
              ("diffusion", "lora-v1.safetensors", "fid-unet-distilled", "distilled", "distillation (SSD-1B-like)")]
    rows = []
    try:
        for part, lora, fam_id, target, kind in cases:
            root = work / part
            if not (root / target).exists():
                continue
            src_fam = get_registry().family("fid-llama" if part == "lm" else "fid-unet")
            res = lorareg.port(lorareg.load(root / lora, family=src_fam.id), source_model=str(root / "v1"), target_model=str(root / target),
                               to=fam_id, method="copy", check="bases", progress=False, cache_dir=cache)
            src_w = open_model(src_fam, str(root / "v1"))
            tgt_w = open_model(get_registry().family(fam_id), str(root / target))
            pairs = [WeightPair(l.source, src_w.stored(*l.source.split(":", 1)), tgt_w.stored(*l.target.split(":", 1)))
                     for l in res.report.layers if not l.skipped and l.target and l.source_shape == l.target_shape]
            chk = check_pairs(pairs)
            rows.append({"pair": f"{part} v1->{target}", "kind": kind, "layers": len(pairs), "mean_cosine": chk.mean_cosine,
                         "min_cosine": chk.min_cosine, "max_cosine": max(chk.cosines), "mean_relative_distance": chk.mean_relative_distance,
                         "mean_subspace_similarity": res.report.totals.related_similarity, "related": chk.related})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def run_child(kind: str, root: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--dir", str(root), "--double", str(args.double), "--single", str(args.single),
           "--only", args.only]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"measurement {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=2, help="double-stream blocks (HunyuanVideo has 20)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (HunyuanVideo has 40)")
    ap.add_argument("--only", default="", help="only the modules whose name matches this regular expression")
    ap.add_argument("--tiny", action="store_true", help="CI size: q/k/v of one double block (57 MB per model), no bases comparison")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size")
    ap.add_argument("--noise", type=float, default=0.01, help="target = source + noise × its scale")
    ap.add_argument("--bases-layers", type=int, default=4, help="layers for the bases-path comparison (0: skip)")
    ap.add_argument("--kinds", default="bare,raw,streamed,no-prefetch,port,mmap", help="measurements to run")
    ap.add_argument("--dir", type=Path, help="work folder (default: a temp dir, deleted after)")
    ap.add_argument("--fidelity-work", type=Path, help="only: the streamed check on the pairs of a `bench/fidelity/run.py --work W` folder")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.double, args.single, args.only, args.bases_layers = 1, 0, r"^transformer_blocks\.0\.attn\.to_[qkv]$", 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.fidelity_work:
        rows = fidelity_pairs(args.fidelity_work)
        for r in rows:
            print(f"  {r['pair']:24s} {r['kind']:32s} {r['layers']:3d} layers: cosine mean {r['mean_cosine']:.4f} "
                  f"[{r['min_cosine']:.4f}, {r['max_cosine']:.4f}], rel. distance {r['mean_relative_distance']:.3f}, "
                  f"subspace similarity {r['mean_subspace_similarity']:.3f}, related {r['related']}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    table = modules(args.double, args.single, args.only)
    if args.measure:
        print(json.dumps(measure(args.measure, args.dir, table)))
        return 0
    own = args.dir is None
    root = Path(tempfile.mkdtemp(prefix="lorareg-streamed-")) if own else args.dir
    try:
        total = sum(math.prod(s) for s in table.values()) * 2
        print(f"{FAMILY}: {args.double} double + {args.single} single blocks (+ non-block modules){' matching ' + args.only if args.only else ''}, "
              f"{len(table)} weights; {total / 1e9:.2f} GB per model, {2 * total / 1e9:.2f} GB both; torch threads {torch.get_num_threads()}")
        t0 = time.perf_counter()
        files = write_models(root, table, int(args.shard_gb * 1e9), args.noise)
        print(f"wrote {len(files)} shards in {time.perf_counter() - t0:.1f} s into {root}")
        results = {"config": {"double": args.double, "single": args.single, "only": args.only, "weights": len(table),
                              "gb_per_model": total / 1e9, "shards": len(files)}, "runs": []}
        kinds = [k for k in args.kinds.split(",") if k]
        for cache in ("cold", "warm"):
            for kind in kinds:
                if cache == "cold":
                    evict(files)
                r = run_child(kind, root, args)
                r["cache"] = cache
                results["runs"].append(r)
                print(f"  {cache:4s} {kind:12s} {r['seconds']:7.2f} s  {r['s_per_gb']:6.3f} s/GB  peak RSS {r['peak_rss_mb']:7.0f} MB "
                      f"(+{r['peak_above_start_mb']:.0f} MB over start)" + (f"  mean cos {r['mean_cosine']:.5f}" if r.get("mean_cosine") else ""))
        for cache in ("cold", "warm"):
            base = {r["kind"]: r for r in results["runs"] if r["cache"] == cache and r["kind"] in ("bare", "raw")}
            for r in results["runs"]:
                if r["cache"] == cache and r["kind"] not in base:
                    for name, b in base.items():
                        r[f"vs_{name}"] = r["seconds"] / b["seconds"]
                    print(f"  {cache:4s} {r['kind']:12s} " + ", ".join(f"/ {n} read: {r[f'vs_{n}']:.2f}x time" for n in base)
                          + f"; peak RSS {r['peak_rss_mb']:.0f} MB vs " + ", ".join(f"{b['peak_rss_mb']:.0f} MB ({n})" for n, b in base.items()))
        if args.bases_layers:
            rows = bases_vs_streamed(root, table, args.bases_layers)
            results["bases_vs_streamed"] = rows
            for row in rows:
                print(f"  layer {row['layer']} {row['shape']} k={row['k']}: bases {row['bases_s']:.2f} s vs streamed {row['streamed_s']:.3f} s "
                      f"= {row['ratio']:.0f}x (similarity {row['similarity']:.3f}, cosine {row['cosine']:.5f})")
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
