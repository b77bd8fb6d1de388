"""Rectified-flow schedules (HunyuanVideo, Wan, FLUX.1, Chroma) and an Euler sampler over them.

Convention: x_σ = (1 − σ)·x0 + σ·noise, so the velocity a denoiser predicts is dx/dσ = noise − x0; σ = 1 is
pure noise. A schedule's ``shift`` spends more of the steps at high noise: σ(s) = shift·s / (1 + (shift − 1)·s)
for s uniform in (0, 1].
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
from pydantic import BaseModel

from ..core.errors import InputError
from ..registry.families import DiffusionSpec, FlowSchedule
from .noise import scheduler_config

#: scheduler-config keys read over the family's values (UniPC configs of Wan call the shift ``flow_shift``)
_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")


class Flow(BaseModel):
    """A flow schedule as used: the family's values with the model folder's scheduler config over them."""

    schedule: FlowSchedule
    source: str  # the scheduler config file, or "family"

    def shift_for(self, tokens: int) -> float:
        """The shift at ``tokens`` image tokens per frame: static, or FLUX.1's resolution-dependent one (e^μ, μ linear in tokens)."""
        s = self.schedule
        if not s.use_dynamic_shifting:
            return s.shift
        slope = (s.max_shift - s.base_shift) / max(1, s.max_image_seq_len - s.base_image_seq_len)
        return math.exp(s.base_shift + slope * (tokens - s.base_image_seq_len))


def read_flow(model_folder: Optional[Path], spec: DiffusionSpec) -> Flow:
    if not isinstance(spec.noise_schedule, FlowSchedule):
        raise InputError("the family's noise schedule is not a flow-matching one")
    values = spec.noise_schedule.model_dump()
    source = "family"
    cfg, path = scheduler_config(model_folder, spec)
    if path is not None:
        if cfg.get("flow_shift") is not None and cfg.get("shift") is None:
            cfg["shift"] = cfg["flow_shift"]
        for key in _KEYS:
            if cfg.get(key) is not None:
                values[key] = cfg[key]
        if cfg.get("prediction_type") not in (None, "flow_prediction", "flow"):
            raise InputError(f"{path}: prediction_type {cfg['prediction_type']!r} is not a flow-matching velocity")
        # conventions this sampler does not follow: σ = 1 as clean data, or a shift linear in μ instead of e^μ
        if cfg.get("invert_sigmas"):
            raise InputError(f"{path}: invert_sigmas (σ = 1 is the clean sample) is not supported by --refine distill")
        if values["use_dynamic_shifting"] and cfg.get("time_shift_type", "exponential") != "exponential":
            raise InputError(f"{path}: time_shift_type {cfg['time_shift_type']!r} is not supported by --refine distill (exponential only)")
        source = str(path)
    return Flow(schedule=FlowSchedule(**values), source=source)


def shifted(s: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


def unshifted(sigma: float, shift: float) -> float:
    """The uniform s whose shifted σ is ``sigma`` (the inverse of :func:`shifted`)."""
    return sigma / (shift - (shift - 1) * sigma)


def sampling_sigmas(steps: int, shift: float) -> torch.Tensor:
    """σ from 1 down to 0 in ``steps`` Euler steps (steps + 1 values), float64."""
    return shifted(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def random_sigmas(n: int, shift: float, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    """``n`` noise levels drawn as a sampler visits them (uniform s, shifted), kept in [low, high)."""
    a, b = unshifted(low, shift), unshifted(high, shift)
    s = a + (b - a) * torch.rand(n, generator=g, dtype=torch.float64)
    return shifted(s, shift).clamp(1e-4, 1.0).float()


def add_flow_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise


@torch.no_grad()
def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate dx/dσ = v from sigmas[0] to sigmas[-1]; ``velocity(x, σ)`` gets a batch at one σ (a [B] tensor)."""
    x = x.double()
    for i in range(len(sigmas) - 1):
        sigma = torch.full((x.shape[0],), float(sigmas[i]))
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x.float(), sigma).double()
    return x.float()
