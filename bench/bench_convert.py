"""Conversion speed: lorareg vs diffusers' own kohya->diffusers path vs a bare safetensors read+write.

Builds a rank-32 kohya SDXL LoRA (sd-scripts SGM names, fp16) on every attention projection of the
UNet (attn1/attn2 to_q/to_k/to_v/to_out.0) and the self-attention of both text encoders, then times,
in one process and one run, each way of turning it into a diffusers-format file:

  safetensors   load_file + save_file of the same tensors (the floor: no renaming at all)
  diffusers     StableDiffusionXLPipeline.lora_state_dict (its kohya->diffusers conversion) + save_file
  diffusers+saver  the same conversion, then StableDiffusionXLPipeline.save_lora_weights
  lorareg-first    lorareg.convert(..., to="diffusers") of a file met for the first time (empty memory: detection of
                   every format and family, NaN scan, the source's and the output's SHA-256s, provenance, atomic write)
  lorareg          the same convert repeated: what the first learnt is remembered by file fingerprint
  lorareg-no-hash-no-scan  lorareg.load(hash=False) + lorareg.save: no source hash, no NaN scan (the output's own
                   hash fields are still written, from memory after the warm-up)

Each is run --repeat times after one warm-up, round-robin; medians and ratios are printed. Page cache is warm.
Usage: python bench/bench_convert.py [--repeat 7] [--rank 32] [--json]
"""

from __future__ import annotations

import argparse
import os
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import lorareg
from lorareg.registry import get_registry
from lorareg.registry.naming import flatten


def build_lora(path: Path, rank: int) -> int:
    fam = get_registry().family("sdxl")
    g = torch.Generator().manual_seed(0)
    sd = {}
    unet = fam.components["unet"]
    for name, shape in unet.modules.items():
        if any(f".{a}.{p}" in name + "." for a in ("attn1", "attn2") for p in ("to_q.", "to_k.", "to_v.", "to_out.0.")):
            base = "lora_unet_" + flatten(unet.name_in("ldm", name))
            sd[base + ".lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) * 0.01).half()
            sd[base + ".lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.01).half()
            sd[base + ".alpha"] = torch.tensor(float(rank // 2)).half()
    for cid, prefix in (("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
        for name, shape in fam.components[cid].modules.items():
            if ".self_attn." in name:
                base = prefix + flatten(name)
                sd[base + ".lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) * 0.01).half()
                sd[base + ".lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.01).half()
                sd[base + ".alpha"] = torch.tensor(float(rank // 2)).half()
    save_file(sd, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": str(rank)})
    return len(sd)


def time_all(paths: dict, repeat: int) -> dict[str, list[float]]:
    """Timings of each path, run round-robin (one run of every path per round, so that a change of load on
    a shared machine hits them alike). Outside the timed region: earlier outputs are deleted (each run writes
    a new file, as a user's conversion does) and garbage is collected (freeing the previous run's mappings
    is not part of a conversion). ``paths``: name -> (function, outputs it writes)."""
    import gc
    import shutil

    def clean(outputs):
        for p in outputs:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
        gc.collect()

    for fn, outputs in paths.values():  # warm-up (imports, registry tables, page cache)
        clean(outputs)
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeat):
        for name, (fn, outputs) in paths.items():
            clean(outputs)
            c, t = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
            CPU.setdefault(name, []).append(time.process_time() - c)
    for _, outputs in paths.values():
        clean(outputs)
    return times


#: CPU seconds (all threads of this process) of each timed run: what a busy machine cannot inflate as much
CPU: dict[str, list[float]] = {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from diffusers import StableDiffusionXLPipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["LORAREG_CACHE"] = str(tmp / "cache")  # the hash memory of this run only
        src = tmp / "sdxl_kohya.safetensors"
        n = build_lora(src, args.rank)
        size_mib = src.stat().st_size / 2**20

        payload = src.read_bytes()

        def write_floor():
            # writing the same number of bytes to a new file: no conversion can go below this
            (tmp / "floor.bin").write_bytes(payload)

        def bare():
            save_file(load_file(str(src)), str(tmp / "bare.safetensors"))

        def diffusers_path():
            state_dict, network_alphas = StableDiffusionXLPipeline.lora_state_dict(str(src))
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp / "diffusers.safetensors"))

        def diffusers_saver_path():
            # diffusers' converter, then its own LoRA saver (what a diffusers user runs to convert a file)
            state_dict, network_alphas = StableDiffusionXLPipeline.lora_state_dict(str(src))
            unet = {k[len("unet."):]: v for k, v in state_dict.items() if k.startswith("unet.")}
            te = {k[len("text_encoder."):]: v for k, v in state_dict.items() if k.startswith("text_encoder.")}
            te2 = {k[len("text_encoder_2."):]: v for k, v in state_dict.items() if k.startswith("text_encoder_2.")}
            StableDiffusionXLPipeline.save_lora_weights(str(tmp / "saver"), unet_lora_layers=unet, text_encoder_lora_layers=te,
                                                        text_encoder_2_lora_layers=te2, safe_serialization=True)

        def lorareg_bare_path():
            # the same read + write without the source's SHA-256 provenance hashes and the NaN/Inf scan
            lora = lorareg.load(src, hash=False)
            lorareg.save(lora, tmp / "lorareg-bare.safetensors", format="diffusers")

        def lorareg_path():
            # a repeated convert: what the first learnt of the source (its hashes, NaN scan, detection verdict)
            # and the output's data hash are remembered by fingerprint (lorareg.core.hash_memory)
            lorareg.convert(src, tmp / "lorareg.safetensors", to="diffusers")

        fresh = iter(range(10**6))

        def lorareg_first_path():
            # a file's first convert: an empty memory each run, so the source is hashed, scanned and detected
            os.environ["LORAREG_CACHE"] = str(tmp / f"cache-{next(fresh)}")
            try:
                lorareg.convert(src, tmp / "lorareg-first.safetensors", to="diffusers")
            finally:
                os.environ["LORAREG_CACHE"] = str(tmp / "cache")

        t0 = time.perf_counter()
        lorareg.convert(src, tmp / "cold.safetensors", to="diffusers", force=True)
        first_call = time.perf_counter() - t0
        results = time_all({
            "write-only floor": (write_floor, [tmp / "floor.bin"]),
            "safetensors": (bare, [tmp / "bare.safetensors"]),
            "diffusers": (diffusers_path, [tmp / "diffusers.safetensors"]),
            "diffusers+saver": (diffusers_saver_path, [tmp / "saver"]),
            "lorareg": (lorareg_path, [tmp / "lorareg.safetensors"]),
            "lorareg-first": (lorareg_first_path, [tmp / "lorareg-first.safetensors"]),
            "lorareg-no-hash-no-scan": (lorareg_bare_path, [tmp / "lorareg-bare.safetensors"]),
        }, args.repeat)
        load = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in results.items()}
    out = {
        "file": {"tensors": n, "MiB": round(size_mib, 1), "rank": args.rank},
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "median_cpu_s": {k: round(statistics.median(v), 4) for k, v in CPU.items()},
        "lorareg_first_call_s": round(first_call, 3),
        "load_average_1min": round(load, 2),
        "speedup_vs_diffusers": round(med["diffusers"] / med["lorareg"], 2),
        "first_vs_diffusers": round(med["lorareg-first"] / med["diffusers"], 2),
        "repeated_speedup_over_first": round(med["lorareg-first"] / med["lorareg"], 2),
        "speedup_vs_diffusers_saver": round(med["diffusers+saver"] / med["lorareg"], 2),
        "ratio_to_bare_safetensors": round(med["lorareg"] / med["safetensors"], 2),
        "targets": {"speedup_vs_diffusers >= 2": med["diffusers"] / med["lorareg"] >= 2, "ratio_to_bare <= 3": med["lorareg"] / med["safetensors"] <= 3},
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"SDXL kohya LoRA: {n} tensors, {size_mib:.1f} MiB, rank {args.rank}; median of {args.repeat} rounds (paths "
          f"round-robin), warm; load average {load:.1f} on {os.cpu_count()} CPUs")
    for k in ("write-only floor", "safetensors", "diffusers", "diffusers+saver", "lorareg-first", "lorareg", "lorareg-no-hash-no-scan"):
        cpu = statistics.median(CPU[k])
        print(f"  {k:<24} {med[k] * 1000:8.1f} ms   ({med[k] / med['safetensors']:.2f}x bare safetensors)   "
              f"CPU {cpu * 1000:6.1f} ms ({cpu / statistics.median(CPU['diffusers']):.2f}x diffusers)")
    print(f"  lorareg first call in a fresh process (registry tables built): {first_call * 1000:.0f} ms")
    print(f"  lorareg vs diffusers (convert + save_file): {out['speedup_vs_diffusers']}x faster (target >= 2x)")
    print(f"  lorareg vs diffusers (convert + save_lora_weights): {out['speedup_vs_diffusers_saver']}x faster")
    print(f"  lorareg vs bare safetensors: {out['ratio_to_bare_safetensors']}x (target <= 3x)")
    print(f"  a file's first convert vs diffusers: {out['first_vs_diffusers']}x the time (target <= 1x); "
          f"a repeated convert: {out['repeated_speedup_over_first']}x faster than the first (target >= 2x)")


if __name__ == "__main__":
    main()
