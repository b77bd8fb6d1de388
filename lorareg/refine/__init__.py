"""Optional refinement of a ported LoRA after the training-free projection (``lorareg port --refine``).

* ``distill`` (language models): data-free self-distillation. Samples are generated once from the
  source model with the source LoRA merged (the teacher); the ported LoRA's factors are then trained
  on the target model to match the teacher's next-token distributions (KL) on those samples.
"""

from .distill_lm import RefineReport, refine_lm

REFINE_METHODS = ("distill",)

__all__ = ["REFINE_METHODS", "RefineReport", "refine_lm"]
