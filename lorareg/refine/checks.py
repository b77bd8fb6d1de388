"""Which refinement a pair of families gets (language model or diffusion UNet), and the checks before it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Literal

from ..core.errors import InputError
from ..registry.families import Family
from .runtime import TOKENIZER_FILES

Kind = Literal["lm", "unet", "dit"]
#: UNet config entries that must agree for a teacher's predictions to be a target for the student
_UNET_INTERFACE = ("in_channels", "out_channels", "cross_attention_dim", "encoder_hid_dim", "addition_embed_type",
                   "projection_class_embeddings_input_dim", "addition_time_embed_dim", "class_embed_type", "num_class_embeds")


def check_pair(refine: str, src: Family, tgt: Family) -> Kind:
    """The refinement kind for this pair of families, or an InputError saying why it cannot be refined."""
    if refine != "distill":
        raise InputError(f"unknown refinement {refine!r} (known: distill)")
    if src.spec.kind == "text" and tgt.spec.kind == "text":
        return "lm"
    if all(f.spec.diffusion is not None and f.spec.diffusion.denoiser is not None for f in (src, tgt)):
        return _check_transformers(src, tgt)
    for fam in (src, tgt):
        if fam.spec.kind == "text" or fam.spec.diffusion is None or "unet" not in fam.components:
            raise InputError(f"distill refinement works between two language models, two diffusion UNets or two diffusion "
                             f"transformers with flow-matching data; {src.id} ({src.spec.kind}) -> {tgt.id} ({tgt.spec.kind}) is none of these")
    a, b = src.spec.diffusion, tgt.spec.diffusion
    if a.latent_space != b.latent_space:
        raise InputError(f"{src.id} -> {tgt.id}: the latent spaces differ ({a.latent_space} vs {b.latent_space}); the teacher's "
                         "latents mean nothing to the student, so this pair cannot be refined by distillation")
    enc_a = [(c.component, c.layer, c.pooled, src.components[c.component].spec.architecture.config) for c in a.conditioning]
    enc_b = [(c.component, c.layer, c.pooled, tgt.components[c.component].spec.architecture.config) for c in b.conditioning]
    if enc_a != enc_b:
        raise InputError(f"{src.id} -> {tgt.id}: the text encoders differ; the two UNets are conditioned on different embeddings, "
                         "so this pair cannot be refined by distillation")
    ca = src.components["unet"].spec.architecture.config
    cb = tgt.components["unet"].spec.architecture.config
    for key in _UNET_INTERFACE:
        if ca.get(key) != cb.get(key):
            raise InputError(f"{src.id} -> {tgt.id}: the UNets' inputs differ ({key}: {ca.get(key)} vs {cb.get(key)}); "
                             "this pair cannot be refined by distillation")
    return "unet"


def _encoder_signature(fam: Family, c) -> tuple:
    comp = fam.components.get(c.component)
    arch = (comp.spec.architecture.class_, comp.spec.architecture.config) if comp is not None else (c.class_, None)
    return (arch[0], json.dumps(arch[1], sort_keys=True), c.hidden, c.hidden_layer, c.layer, c.max_length, c.zero_padding)


def _check_transformers(src: Family, tgt: Family) -> Kind:
    a, b = src.spec.diffusion, tgt.spec.diffusion
    if a.latent_space != b.latent_space:
        raise InputError(f"{src.id} -> {tgt.id}: the latent spaces differ ({a.latent_space} vs {b.latent_space}); the teacher's "
                         "latents mean nothing to the student, so this pair cannot be refined by distillation")
    if a.prediction_type != "flow" or b.prediction_type != "flow":
        raise InputError(f"{src.id} -> {tgt.id}: transformer distillation needs flow-matching (velocity) models on both sides")
    if a.denoiser.latent_channels != b.denoiser.latent_channels:
        raise InputError(f"{src.id} -> {tgt.id}: the latents have {a.denoiser.latent_channels} vs {b.denoiser.latent_channels} channels")
    if a.denoiser.latents != b.denoiser.latents:
        raise InputError(f"{src.id} -> {tgt.id}: one makes {a.denoiser.latents} latents, the other {b.denoiser.latents}")
    ic = a.denoiser.image_condition
    if ic is not None and ic.required:
        raise InputError(f"{src.id} is an image-conditioned model: as a teacher it needs a conditioning image for every sample it "
                         "makes, which a data-free refinement does not have")
    ic = b.denoiser.image_condition
    if ic is not None and ic.required and ic.type == "sequence":
        raise InputError(f"{tgt.id} needs reference-image tokens in its sequence; that conditioning is not implemented")
    # the student may read fewer encoders than the teacher (FLUX.1 -> Chroma drops CLIP), never one the teacher lacks
    teacher = {_encoder_signature(src, c) for c in a.conditioning if c.hidden}
    missing = [c.component for c in b.conditioning if c.hidden and _encoder_signature(tgt, c) not in teacher]
    if missing:
        raise InputError(f"{src.id} -> {tgt.id}: the text encoders differ ({', '.join(missing)} of {tgt.id} has no equal in "
                         f"{src.id}); the two transformers are conditioned on different embeddings, so this pair cannot be refined by distillation")
    return "dit"


def check_models(kind: Kind, source_folder: Path, target_folder: Path) -> None:
    """Model-level checks that need the files: the libraries, and the same tokenizer for language models."""
    for lib in ("transformers",) if kind == "lm" else ("diffusers", "transformers"):
        if importlib.util.find_spec(lib) is None:
            raise InputError(f"--refine distill needs {lib} (pip install 'lorareg[refine]')")
    if kind in ("unet", "dit"):
        return
    folders = [source_folder, target_folder]
    configs = []
    for f in folders:
        try:
            configs.append(json.loads((f / "config.json").read_text()))
        except (OSError, ValueError):
            raise InputError(f"{f}: --refine distill needs a transformers model folder with a config.json") from None
    vocab = [c.get("vocab_size") for c in configs]
    if vocab[0] != vocab[1]:
        raise InputError(f"the two models have different vocabularies (vocab_size {vocab[0]} vs {vocab[1]}); "
                         "distillation needs the same tokenizer on both sides")
    for name in TOKENIZER_FILES:
        a, b = folders[0] / name, folders[1] / name
        if name != "tokenizer_config.json" and a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
            raise InputError(f"the two models' {name} differ; distillation needs the same tokenizer on both sides")
