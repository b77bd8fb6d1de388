"""What the four provenance hashes cost on top of the one SHA-256 lorareg always took.

Builds a LoRA-sized safetensors file (fp16 tensors, --mib of data) and times, in one process:
  sha256      hashlib over the whole file (what `load` computed before: the floor)
  two passes  the whole-file SHA-256, then the data-section SHA-256, one after the other
  file_hashes lorareg.core.hashes.file_hashes: SHA-256, AutoV2, tensor-data hash, AutoV3, legacy
  own fields  lorareg.core.hashes.own_hash_fields on the same tensors (what every write adds)
Medians of --repeat runs after a warm-up; the page cache is warm.
Usage: python bench/bench_hashes.py [--mib 256] [--repeat 7]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorareg.core.hashes import file_hashes, own_hash_fields
from lorareg.core.io import open_tensors, read_header


def median_s(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        n = args.mib * (1 << 20) // 2 // 64
        save_file({f"t{i}": torch.randn(n // 64, 64).half() for i in range(64)}, str(path), {"ss_network_dim": "32"})
        header = read_header(path)
        tensors, meta, _ = open_tensors(path)

        def sha_only():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)

        def two_passes():
            raw = memoryview(header.mapping())
            hashlib.sha256(raw).hexdigest()
            hashlib.sha256(raw[header.data_offset:]).hexdigest()

        rows = [("sha256 (floor)", median_s(sha_only, args.repeat)),
                ("two passes", median_s(two_passes, args.repeat)),
                ("file_hashes (4 hashes)", median_s(lambda: file_hashes(header), args.repeat)),
                ("own_hash_fields (on write)", median_s(lambda: own_hash_fields(tensors, meta), args.repeat))]
        size = path.stat().st_size / (1 << 20)
        print(f"file: {size:.0f} MiB, {len(tensors)} tensors; median of {args.repeat}")
        for name, s in rows:
            print(f"  {name:28s} {1000 * s:8.1f} ms  {s / rows[0][1]:5.2f}x  {size / s:7.0f} MiB/s")


if __name__ == "__main__":
    main()
