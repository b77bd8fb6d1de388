"""Optional refinement of a ported LoRA after the training-free projection (``lorareg port --refine``).

``distill``: data-free self-distillation. The source model with the source LoRA merged is the
teacher; it makes its own samples once (text for language models, latents for diffusion UNets),
and the ported LoRA's factors are trained on the target model to match the teacher's outputs on
them (KL of next-token distributions; MSE of noise predictions). The base weights stay frozen.
"""

from .checks import RefineOptions
from .lm import RefineReport, refine_lm
from .unet import UnetRefineReport, refine_unet

REFINE_METHODS = ("distill",)

__all__ = ["REFINE_METHODS", "RefineOptions", "RefineReport", "UnetRefineReport", "refine_lm", "refine_unet"]
