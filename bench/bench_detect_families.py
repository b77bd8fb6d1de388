"""Detection cost of the video/Flux families: time to detect LoRA files of each kind against every
family in the registry, and side by side against the seven families of the first design only.

    PYTHONPATH=. python bench/bench_detect_families.py

The files are synthetic (zero factors, the real key layouts and shapes: kohya SDXL attention,
musubi HunyuanVideo, musubi Wan 2.1 14B, kohya sd-scripts FLUX.1), written to a temp folder.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorareg.formats.api import _read_source
from lorareg.formats.detect import detect_tensors
from lorareg.core.errors import DetectionError
from lorareg.registry import get_registry

FIRST_DESIGN = ["sd15", "sd21", "sdxl", "ssd-1b", "segmind-vega", "hunyuan-video", "tinyllama"]


def _file(folder: Path, name: str, modules: dict[str, tuple[int, int]]) -> Path:
    sd = {}
    for key, (out, inn) in modules.items():
        sd[f"{key}.lora_down.weight"] = torch.zeros(4, inn, dtype=torch.float16)
        sd[f"{key}.lora_up.weight"] = torch.zeros(out, 4, dtype=torch.float16)
        sd[f"{key}.alpha"] = torch.tensor(4.0)
    path = folder / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


def files(folder: Path) -> dict[str, Path]:
    sdxl = get_registry().family("sdxl").components["unet"].modules
    out = {"sdxl kohya (attention)": _file(folder, "sdxl", {
        "lora_unet_" + n.replace(".", "_"): s for n, s in sdxl.items() if len(s) == 2 and (".attn1." in n or ".attn2." in n)})}
    hv = {}
    for i in range(20):
        hv[f"lora_unet_double_blocks_{i}_img_attn_qkv"] = (9216, 3072)
        hv[f"lora_unet_double_blocks_{i}_img_mlp_fc1"] = (12288, 3072)
    for i in range(40):
        hv[f"lora_unet_single_blocks_{i}_linear1"] = (21504, 3072)
    out["HunyuanVideo musubi"] = _file(folder, "hv", hv)
    wan = {f"lora_unet_blocks_{i}_{a}_{p}": (5120, 5120) for i in range(40) for a in ("self_attn", "cross_attn") for p in "qkvo"}
    out["Wan 2.1 14B musubi"] = _file(folder, "wan", wan)
    flux = {}
    for i in range(19):
        flux[f"lora_unet_double_blocks_{i}_img_attn_qkv"] = (9216, 3072)
        flux[f"lora_unet_double_blocks_{i}_img_mod_lin"] = (18432, 3072)
    for i in range(38):
        flux[f"lora_unet_single_blocks_{i}_linear1"] = (21504, 3072)
    out["FLUX.1 kohya"] = _file(folder, "flux", flux)
    return out


def timed(path: Path, families) -> tuple[float, str]:
    reg = get_registry()
    tensors, metadata, container, _, _ = _read_source(path)
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        try:
            det, _ = detect_tensors(tensors, metadata, reg, container, families=families)
            verdict = det.family + (f" (undecided: {', '.join(det.undecided)})" if det.undecided else "")
        except DetectionError:
            verdict = "no family"  # the first design knew no Wan / FLUX.1
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), verdict


def main() -> None:
    reg = get_registry()
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'file':<26} {'tensors':>7} {'all ' + str(len(reg.families)) + ' families':>18} {'first 7':>10} {'ratio':>6}  verdict")
        for label, path in files(Path(tmp)).items():
            n = len(_read_source(path)[0])
            t_all, fam = timed(path, None)
            t_old, old = timed(path, FIRST_DESIGN)
            print(f"{label:<26} {n:>7} {1000 * t_all:>15.0f} ms {1000 * t_old:>7.0f} ms {t_all / t_old:>6.2f}  {fam}  [first 7: {old}]")


if __name__ == "__main__":
    main()
