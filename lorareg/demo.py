"""The offline first-contact job: inspect and convert the embedded example LoRA, and prove it exact."""

from __future__ import annotations

import tempfile
from importlib import resources
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from . import api
from .io import open_tensors

EXAMPLE = "sd15-kohya-example.safetensors"


def example_path() -> Path:
    return Path(str(resources.files("lorareg") / "examples" / EXAMPLE))


class DemoStep(BaseModel):
    action: str
    output: str
    format: str
    tensors: int


class DemoResult(BaseModel):
    example: str
    detected_format: str
    detected_family: str
    modules: int
    steps: list[DemoStep]
    round_trip_bit_exact: bool
    max_delta_error: float


def run_demo(out_dir: Optional[Path] = None) -> DemoResult:
    src = example_path()
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="lorareg-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    info = api.inspect(src)
    original = api.load(src)
    steps = []
    diffusers = out / "example-diffusers.safetensors"
    back = out / "example-kohya-again.safetensors"
    for target, path in (("diffusers", diffusers), ("kohya", back)):
        source = src if target == "diffusers" else diffusers
        rep = api.convert(source, path, to=target, force=True)
        steps.append(DemoStep(action=f"convert {source.name} -> {target}", output=str(path), format=rep.target_format, tensors=rep.tensors_out))
    converted = api.load(diffusers)
    worst = 0.0
    for key, m in original.modules.items():
        a, b = m.delta_weight(), converted.modules[key].delta_weight()
        worst = max(worst, float((a - b).abs().max()))
    a_t, _, _ = open_tensors(src)
    b_t, _, _ = open_tensors(back)
    exact = set(a_t) == set(b_t) and all(a_t[k].raw_bytes() == b_t[k].raw_bytes() and a_t[k].dtype == b_t[k].dtype for k in a_t)
    return DemoResult(
        example=str(src),
        detected_format=f"{info.format}/{info.variant}",
        detected_family=info.family,
        modules=info.num_modules,
        steps=steps,
        round_trip_bit_exact=exact,
        max_delta_error=worst,
    )
