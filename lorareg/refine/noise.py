"""The forward-noising schedule of a diffusion model and a deterministic DDIM sampler over it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
from pydantic import BaseModel

from ..core.errors import InputError
from ..registry.families import DiffusionSpec


class Schedule(BaseModel):
    num_train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    prediction_type: str
    source: str  # where the values came from: the model folder's scheduler config or the family file


def scheduler_config(model_folder: Optional[Path], spec: DiffusionSpec) -> tuple[dict, Optional[Path]]:
    """The model folder's ``<scheduler_path>/scheduler_config.json`` and its path, or ({}, None) when it has none."""
    path = model_folder / spec.scheduler_path / "scheduler_config.json" if model_folder is not None else None
    if path is None or not path.is_file():
        return {}, None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{path}: not valid JSON") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: not a JSON object")
    return cfg, path


def read_schedule(model_folder: Optional[Path], spec: DiffusionSpec) -> Schedule:
    """The family's schedule, overridden by the model folder's ``scheduler/scheduler_config.json``."""
    ns = spec.noise_schedule
    values = {"num_train_timesteps": ns.num_train_timesteps, "beta_schedule": ns.beta_schedule, "beta_start": ns.beta_start,
              "beta_end": ns.beta_end, "prediction_type": spec.prediction_type, "source": "family"}
    cfg, path = scheduler_config(model_folder, spec)
    if path is not None:
        for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type"):
            if cfg.get(key) is not None:
                values[key] = cfg[key]
        values["source"] = str(path)
    sched = Schedule(**values)
    if sched.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        raise InputError(f"{sched.source}: beta_schedule {sched.beta_schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")
    if sched.prediction_type not in ("epsilon", "v_prediction"):
        raise InputError(f"{sched.source}: prediction_type {sched.prediction_type!r} is not supported (epsilon, v_prediction)")
    return sched


def alphas_cumprod(s: Schedule) -> torch.Tensor:
    """ᾱ_t for t = 0 .. T-1 (float64 for accuracy near t = T-1)."""
    T = s.num_train_timesteps
    if s.beta_schedule == "linear":
        betas = torch.linspace(s.beta_start, s.beta_end, T, dtype=torch.float64)
    elif s.beta_schedule == "scaled_linear":
        betas = torch.linspace(math.sqrt(s.beta_start), math.sqrt(s.beta_end), T, dtype=torch.float64) ** 2
    else:  # squaredcos_cap_v2: the cosine schedule of improved DDPM, betas capped at 0.999
        bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - bar((i + 1) / T) / bar(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    a = ac[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


@torch.no_grad()
def ddim_sample(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int,
                s: Schedule, ac: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from pure noise in ``steps`` evenly spaced timesteps.

    ``denoise(x, t)`` returns the model's output (ε or v as the schedule says) for a batch at one t.
    The timesteps are T/steps apart and end at 0, so the first is T - T/steps, not T - 1: at T - 1
    a cosine schedule has ᾱ ≈ 0 and the x0 estimate explodes.
    """
    T = s.num_train_timesteps
    stride = max(1, T // steps)
    ts = torch.arange(min(steps, T) - 1, -1, -1) * stride
    x = noise.double()
    for i, t in enumerate(ts.tolist()):
        a = ac[t]
        a_prev = ac[int(ts[i + 1])] if i + 1 < len(ts) else torch.tensor(1.0, dtype=torch.float64)
        out = denoise(x.to(noise.dtype), torch.full((x.shape[0],), t, dtype=torch.long)).double()
        if s.prediction_type == "v_prediction":
            x0 = a.sqrt() * x - (1 - a).sqrt() * out
            eps = (1 - a).sqrt() * x + a.sqrt() * out
        else:
            eps = out
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x.to(noise.dtype)
