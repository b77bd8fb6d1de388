"""The settings of ``--refine distill``, with their defaults (the one place they are set)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict

from ..core.lora import Lora
from ..registry.families import Family


class RefineOptions(BaseModel):
    """Settings of ``--refine distill``; the ones that do not apply to a model kind are ignored."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    steps: int = 100
    samples: Optional[int] = None  # None: the model kind's default (64; 32 latents for transformers)
    lr: Optional[float] = None  # None: the model kind's default (lm.DEFAULT_LR, unet.DEFAULT_LR)
    seed: int = 0
    budget_seconds: Optional[float] = None
    batch: Optional[int] = None  # None: the model kind's default (lm.DEFAULT_BATCH, unet.DEFAULT_BATCH)
    # language models
    sample_length: int = 128
    # diffusion UNets and transformers
    prompts: Optional[list[str]] = None
    #: instead of prompts: for UNets a [P, L, D] tensor of contexts; for transformers a dict of [P, ...] tensors named as
    #: the family's denoiser inputs (text, text_mask, pooled, image_embeds), or one [P, L, D] tensor of text states
    conditions: Optional[Any] = None
    prompts_embeds: Optional[Path] = None  # transformers: a safetensors file of such tensors (precomputed text embeddings)
    latent_size: Optional[int] = None
    sampler_steps: int = 8
    noisings: int = 4
    guidance: Optional[float] = None  # classifier-free guidance; None: 5.0 for UNets, the family's value for transformers
    # diffusion transformers
    frames: Optional[int] = None  # latent frames of a video teacher's samples (None: 3)
    #: what the student's velocity is trained towards: the teacher's velocity (the default), or the sample's own (noise - x0)
    target: Optional[Literal["teacher", "sample"]] = None


@dataclass
class RefineJob:
    """What a refinement works on, besides the ported LoRA: the source side (teacher) and the target's model."""

    source_lora: Lora
    source_family: Family
    target_family: Family
    source_model: Path
    target_model: Path
    device: torch.device
    progress: bool = True
    start_method: Optional[str] = None
    cache_dir: Optional[Path] = None
