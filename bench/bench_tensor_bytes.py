"""Tensor bytes without numpy (issue 14): lorareg convert with the torch-only byte view vs the numpy one.

Every tensor lorareg writes goes through ``LazyTensor.buffer`` (on bench_convert.py's file: all 1472
output tensors, 113 MiB, since the NaN scan leaves each a torch view of the mapped input). Before issue 14
that was ``memoryview(t.view(torch.uint8).numpy())``; now it is :func:`lorareg.core.io.tensor_buffer` (a
ctypes array over the tensor's memory). Both run in one process, interleaved round by round (the
machine's load hits both alike), on bench_convert.py's input:

  convert    lorareg.convert(kohya -> diffusers), whole command, median of --repeat rounds
  bytes      the byte views alone over the same 1472 tensors, and the sha256 of them (as the basis cache digests weights)

Needs numpy for the "before" side only. Usage: python bench/bench_tensor_bytes.py [--repeat 7] [--rank 32]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import lorareg  # noqa: E402
from lorareg.core import io  # noqa: E402
from bench_convert import build_lora  # noqa: E402


def numpy_buffer(t: torch.Tensor) -> memoryview:
    """The pre-issue-14 byte view (numpy)."""
    t = t.contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def lazy_buffer_with(view):
    def buffer(self):
        if self._tensor is not None:
            return view(self._tensor)
        return self._header.view(self._info)
    return buffer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args()
    ways = {"numpy (before)": numpy_buffer, "torch-only (now)": io.tensor_buffer}
    original = io.LazyTensor.buffer
    conv = {k: [] for k in ways}
    views = {k: [] for k in ways}
    hashes = {k: [] for k in ways}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "sdxl_kohya.safetensors"
        n = build_lora(src, args.rank)
        tensors = [t.torch() for t in io.open_tensors(src)[0].values()]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        try:
            for r in range(args.repeat + 1):  # round 0 warms up
                for name, view in ways.items():
                    io.LazyTensor.buffer = lazy_buffer_with(view)
                    out = tmp / "out.safetensors"
                    out.unlink(missing_ok=True)
                    gc.collect()
                    t0 = time.perf_counter()
                    lorareg.convert(src, out, to="diffusers")
                    t1 = time.perf_counter()
                    bufs = [view(t) for t in tensors]
                    t2 = time.perf_counter()
                    h = hashlib.sha256()
                    for b in bufs:
                        h.update(b)
                    t3 = time.perf_counter()
                    if r:
                        conv[name].append(t1 - t0)
                        views[name].append(t2 - t1)
                        hashes[name].append(t3 - t2)
        finally:
            io.LazyTensor.buffer = original
    med = {k: (statistics.median(conv[k]), statistics.median(views[k]), statistics.median(hashes[k])) for k in ways}
    base = med["numpy (before)"]
    print(f"SDXL kohya LoRA -> diffusers: {n} input tensors, {len(tensors)} viewed ({nbytes / 2**20:.1f} MiB); "
          f"median of {args.repeat} interleaved rounds")
    print(f"  {'byte view':<18} {'convert':>10} {'ratio':>6} {'views':>10} {'ratio':>6} {'sha256':>10}")
    for k, (c, v, h) in med.items():
        print(f"  {k:<18} {c * 1000:8.1f} ms {c / base[0]:5.2f}x {v * 1000:8.2f} ms {v / base[1]:5.2f}x {h * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
