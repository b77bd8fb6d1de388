"""Optional refinement of a ported LoRA after the training-free projection (``lorareg port --refine``).

``distill``: data-free self-distillation. The source model with the source LoRA merged is the
teacher; it makes its own samples once (text for language models, latents for diffusion UNets),
and the ported LoRA's factors are trained on the target model to match the teacher's outputs on
them (KL of next-token distributions; MSE of noise or velocity predictions). The base weights stay frozen.

Each model kind is one module with one entry point of the same signature, registered in
:data:`REFINERS`; :mod:`.checks` says which kind a pair of families gets.
"""

from __future__ import annotations

from typing import Callable

from ..core.lora import Lora
from .checks import Kind, check_models, check_pair
from .dit import DitRefineReport, refine_dit
from .lm import RefineReport, refine_lm
from .options import RefineJob, RefineOptions
from .report import RefineReportBase, loss_summary, samples_summary
from .unet import UnetRefineReport, refine_unet

Refiner = Callable[[Lora, RefineJob, RefineOptions], tuple[Lora, RefineReportBase]]
REFINERS: dict[Kind, Refiner] = {"lm": refine_lm, "unet": refine_unet, "dit": refine_dit}


def run(kind: Kind, ported: Lora, job: RefineJob, options: RefineOptions) -> tuple[Lora, dict]:
    """Refine ``ported`` with the refinement of this model kind; the LoRA and its report entry."""
    refined, report = REFINERS[kind](ported, job, options)
    return refined, report.model_dump()


__all__ = [
    "DitRefineReport",
    "REFINERS",
    "RefineJob",
    "RefineOptions",
    "RefineReport",
    "UnetRefineReport",
    "check_models",
    "check_pair",
    "loss_summary",
    "refine_dit",
    "refine_lm",
    "refine_unet",
    "run",
    "samples_summary",
]
