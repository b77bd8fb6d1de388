"""Helpers for tests/test_consumers.py: the real models of the registered families, built on the
meta device from the family files, with only the modules a test adapts given real memory; a
capture of the peers' log output; ΔW comparison.

Nothing here re-implements a peer: diffusers, PEFT, transformers and LyCORIS are used as libraries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import torch

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ROOT / "schemas" / "families"


def family_doc(fid: str) -> dict:
    return json.loads((FAMILIES / f"{fid}.json").read_text(encoding="utf-8"))


def arch_config(fid: str, component: str) -> dict:
    return dict(family_doc(fid)["components"][component]["architecture"]["config"])


def meta_unet(fid: str):
    """The family's real diffusers UNet, every parameter on the meta device (no memory, no init)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(arch_config(fid, "unet"))


def text_encoder(fid: str, component: str = "text_encoder"):
    """The family's real CLIP text encoder (transformers class named by the family file).

    Built on meta then given uninitialised CPU memory: untouched pages cost nothing, and the
    weights a test adapts are filled by `fill`. diffusers' loader moves the whole encoder to
    its own `.device`, so every parameter must be real (not meta)."""
    import transformers

    spec = family_doc(fid)["components"][component]["architecture"]
    cls = getattr(transformers, spec["class"])
    with torch.device("meta"):
        model = cls(transformers.CLIPTextConfig(**spec["config"]))
    return model.to_empty(device="cpu")


def llama(fid: str = "tinyllama"):
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**arch_config(fid, "model")))
    return model.to_empty(device="cpu")


def materialise(model: torch.nn.Module, names: Iterable[str], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Give the named modules real memory (random base weights); returns copies of the weights."""
    orig = {}
    for name in names:
        mod = model.get_submodule(name)
        if mod.weight.is_meta:
            mod.to_empty(device="cpu")
        with torch.no_grad():
            mod.weight.normal_(generator=gen)
            if getattr(mod, "bias", None) is not None:
                mod.bias.normal_(generator=gen)
        orig[name] = mod.weight.detach().clone()
    return orig


def lora_pair(weight_shape, rank: int, gen: torch.Generator, scale: float = 0.1):
    """Random (down, up) of kohya/LoCon layout for a base weight of this shape."""
    if len(weight_shape) == 4:
        down = torch.randn(rank, weight_shape[1], *weight_shape[2:], generator=gen) * scale
        up = torch.randn(weight_shape[0], rank, 1, 1, generator=gen) * scale
    else:
        down = torch.randn(rank, weight_shape[1], generator=gen) * scale
        up = torch.randn(weight_shape[0], rank, generator=gen) * scale
    return down, up


def flat(name: str) -> str:
    return name.replace(".", "_")


def base_weight(mod: torch.nn.Module) -> torch.Tensor:
    """The (merged) weight of a plain module or a PEFT-wrapped one."""
    return (mod.base_layer.weight if hasattr(mod, "base_layer") else mod.weight).detach()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if "LOAD REPORT" in msg and _only_base_weights_missing(msg):
            return
        self.records.append(f"{record.name}: {msg}")


def _only_base_weights_missing(report: str) -> bool:
    """transformers' adapter LOAD REPORT lists the base model's own parameters as MISSING (an
    adapter state dict holds none of them): that is not about the LoRA. Anything else (UNEXPECTED,
    MISMATCH, a missing lora_ key) is."""
    rows = [line.split("|") for line in report.splitlines() if line.count("|") >= 2]
    rows = [[c.strip() for c in r] for r in rows[1:]]  # skip the header row
    return bool(rows) and all(r[1] == "MISSING" and "lora_" not in r[0] for r in rows)


# Python warnings the peers emit on every call, unrelated to keys or weights.
_NOISE = re.compile(r"is_gradient_checkpointing|torchvision|already merged|deprecat", re.I)


@contextlib.contextmanager
def peer_messages(loggers=("diffusers", "peft", "transformers")) -> Iterator[list[str]]:
    """Collects WARNING+ log records of the peers' loggers and Python warnings (minus known noise)."""
    handler = _Collect()
    got: list[str] = []
    objs = [logging.getLogger(n) for n in loggers]
    for lg in objs:
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            yield got
    finally:
        for lg in objs:
            lg.removeHandler(handler)
    got.extend(handler.records)
    got.extend(str(w.message) for w in ws if not _NOISE.search(str(w.message)))


@contextlib.contextmanager
def one_thread():
    """torch's multi-threaded LAPACK SVD is up to ~8x slower than one thread on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@contextlib.contextmanager
def lycoris_preset(names: Iterable[str], enable_conv: bool = True):
    """LyCORIS presets are class attributes of LycorisNetwork: set one that adapts exactly `names`,
    and restore the class afterwards."""
    from lycoris.wrapper import LycorisNetwork

    attrs = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP",
             "NAME_ALGO_MAP", "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {a: getattr(LycorisNetwork, a) for a in attrs}
    LycorisNetwork.apply_preset(
        {
            "enable_conv": enable_conv,
            "target_module": [],
            "target_name": ["^" + re.escape(n) + "$" for n in names],
            "module_algo_map": {},
            "name_algo_map": {},
        }
    )
    try:
        yield LycorisNetwork
    finally:
        for a, v in saved.items():
            setattr(LycorisNetwork, a, v)
