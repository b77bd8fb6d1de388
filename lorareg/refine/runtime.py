"""Loading the models a refinement (or an evaluation) runs: transformers and diffusers are optional
dependencies (``lorareg[refine]``), imported inside the loaders for that reason."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Union

import torch

from ..core.errors import InputError

PathLike = Union[str, Path]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@contextmanager
def quiet_progress_bars(library_logging):
    """Silence a library's own progress bars (transformers' or diffusers' ``utils.logging``) while it loads
    a model: only lorareg's bars are shown, and --json output stays clean."""
    bars = library_logging.is_progress_bar_enabled()
    library_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            library_logging.enable_progress_bar()


def load_causal_lm(ref: PathLike, dtype: torch.dtype = torch.float32):
    """A transformers causal LM from a local folder (config.json + weights), in eval mode."""
    path = Path(ref)
    if not (path / "config.json").exists():
        raise InputError(f"{path}: not a transformers model folder (no config.json)")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    with quiet_progress_bars(hf_logging):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model


def load_diffusers_model(class_name: str, path: Path, dtype: torch.dtype, what: str):
    """A diffusers model (UNet or transformer) from its component folder (config.json + safetensors), frozen, in eval mode."""
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json; --refine distill needs the model as a diffusers folder ({what}, text encoders, tokenizers)")
    import diffusers
    from diffusers.utils import logging as dlog

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise InputError(f"{what} class {class_name} is not in this diffusers version")
    with quiet_progress_bars(dlog):
        model = cls.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True)  # never a pickle
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def release() -> None:
    """Return the memory of models the caller has dropped every reference to (and the CUDA cache), before the next loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
