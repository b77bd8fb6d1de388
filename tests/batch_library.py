"""A small LoRA library over the test families (tests/data) for `lorareg scan` / `lorareg batch`:
good files in several formats and families, and broken ones (truncated, pickle, NaN, junk, mixed)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

import lorareg
from lorareg.core.io import LazyTensor
from lora_factory import make_lora, tiny_family_config, ssd_like

ATTN = r"attn[12]\.to_(q|k|v|out\.0)$"
KEPT = [0, 2, 5]


def base_models(root: Path) -> Path:
    """tiny-sdxl and an SSD-like tiny-ssd UNet (diffusers folders), as tests/test_port.py builds them."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    sdxl = UNet2DConditionModel.from_config(tiny_family_config("tiny-sdxl", "unet"))
    sdxl.save_pretrained(root / "sdxl" / "unet")
    ssd = ssd_like(sdxl, UNet2DConditionModel.from_config(tiny_family_config("tiny-ssd", "unet")), KEPT)
    ssd.save_pretrained(root / "ssd" / "unet")
    return root


def sdxl_loras(folder: Path, n: int, *, rank: int = 4, start: int = 0) -> list[Path]:
    """``n`` tiny-sdxl attention LoRAs, alternating kohya and diffusers keys."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        lora = make_lora("tiny-sdxl", ATTN, rank=rank, alpha=float(rank), dtype=torch.float16, seed=i)
        fmt = "kohya" if i % 2 == 0 else "diffusers"
        path = folder / f"style{i:03d}-{fmt}.safetensors"
        lorareg.save(lora, path, format=fmt)
        out.append(path)
    return out


def broken_files(folder: Path) -> dict[str, Path]:
    """One file per kind of problem; the key is the problem kind `lorareg scan` reports."""
    folder.mkdir(parents=True, exist_ok=True)
    good = make_lora("tiny-sdxl", ATTN, rank=2, dtype=torch.float32, seed=99)
    lorareg.save(good, folder / "whole.safetensors", format="kohya")
    data = (folder / "whole.safetensors").read_bytes()
    out = {}
    out["broken"] = folder / "truncated.safetensors"
    out["broken"].write_bytes(data[: len(data) // 2])
    out["pickle"] = folder / "old-style.ckpt"
    out["pickle"].write_bytes(pickle.dumps({"state_dict": {}}, protocol=4))  # only bytes: never loaded
    nan = make_lora("tiny-sdxl", ATTN, rank=2, dtype=torch.float32, seed=98)
    first = next(iter(nan.modules.values()))
    bad = first.factors["up"].torch().clone()
    bad[0, 0] = float("nan")
    first.factors["up"] = LazyTensor.from_torch(bad)
    out["nan"] = folder / "nan.safetensors"
    lorareg.save(nan, out["nan"], format="kohya")
    out["undetected"] = folder / "junk.safetensors"
    from safetensors.torch import save_file

    save_file({"foo.bar": torch.zeros(2, 2)}, str(out["undetected"]))
    (folder / "whole.safetensors").unlink()
    return out


def manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
