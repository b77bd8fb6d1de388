"""The fields every refinement report has (report.json's ``refine`` entry); each model kind adds its own."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel


class RefineReportBase(BaseModel):
    method: str = "distill"
    model: str
    loss: str  # the name of the report's <loss>_start / <loss>_end fields
    steps: int
    steps_requested: int
    samples: int
    batch: int
    lr: float
    start_method: Optional[str] = None
    samples_cached: bool
    sample_s: float
    train_s: float
    wall_s: float
    device: str
    dtype: str
    seed: int
    stopped_by_budget: bool = False
    #: the training ended further from the teacher than it started: the projected factors are kept unchanged
    kept_projection: bool = False


def loss_summary(r: dict) -> tuple[str, Optional[float], Optional[float]]:
    """(loss name, value before, value after) of a refinement report."""
    name = r.get("loss", "kl")
    return name.upper(), r.get(f"{name}_start"), r.get(f"{name}_end")


def samples_summary(r: dict) -> str:
    if r.get("model") == "diffusion unet":
        return (f"{r['samples']} teacher latents of {r['latent_size']}x{r['latent_size']} ({r['sampler_steps']} DDIM steps), "
                f"{r['noisings']} noisings each, prompts: {r['prompts_from']}")
    if r.get("model") == "diffusion transformer":
        frames = f"{r['frames']} latent frames of " if r.get("frames", 1) > 1 else ""
        image = f", {r['image_condition']} image conditioning" if r.get("image_condition") else ""
        return (f"{r['samples']} teacher latents ({frames}{r['latent_size']}x{r['latent_size']}, {r['sampler_steps']} Euler steps, "
                f"shift {r['shift']:g}), {r['noisings']} noisings each, target: the {r['target']}'s velocity{image}, "
                f"prompts: {r['prompts_from']}")
    return f"{r['samples']} teacher samples of {r['sample_length']} tokens"
