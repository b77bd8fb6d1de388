"""LoRA modules on a live torch model: merged into the weights (teacher) or trainable via hooks (student)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..core.errors import InputError
from ..core.io import DTYPES, LazyTensor
from ..core.lora import Lora, Module


def find_module(model: torch.nn.Module, name: str, prefixes: Iterable[str] = ("model.", "text_model.")) -> torch.nn.Module:
    """The submodule (a layer with a weight) called ``name``, allowing for a wrapper prefix present on one side only.

    Checkpoints and library versions disagree on such prefixes: transformers 5 builds CLIP text
    models without ``text_model.``, and causal LMs put the decoder under ``model.``.
    """
    candidates = [name]
    for prefix in prefixes:
        candidates.append(name[len(prefix):] if name.startswith(prefix) else prefix + name)
    for cand in candidates:
        try:
            mod = model.get_submodule(cand)
        except AttributeError:
            continue
        if isinstance(getattr(mod, "weight", None), torch.Tensor):
            return mod
    raise InputError(f"{name}: no layer with a weight of that name in the model")


def modules_of(lora: Lora, component: Optional[str]) -> dict[str, Module]:
    return {k: m for k, m in lora.modules.items() if component is None or m.component == component}


@torch.no_grad()
def merge(model: torch.nn.Module, modules: dict[str, Module]) -> None:
    """Add each module's ΔW to the model's weights (for a teacher that is never trained)."""
    for m in modules.values():
        mod = find_module(model, m.name)
        dw = m.delta_weight().reshape(mod.weight.shape)
        mod.weight.add_(dw.to(device=mod.weight.device, dtype=mod.weight.dtype))


class TrainableLora:
    """Forward hooks adding scale · up(down(x)) to each adapted layer; the factors train in fp32.

    The base model stays frozen and untouched: removing the hooks restores it exactly.
    """

    def __init__(self, model: torch.nn.Module, modules: dict[str, Module], device: torch.device):
        self.params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        self.handles = []
        for key, m in modules.items():
            if m.kind != "lora" or "mid" in m.factors:
                raise InputError(f"{key}: distill refinement needs plain LoRA modules (got {m.type_name})")
            mod = find_module(model, m.name)
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                raise InputError(f"{key}: distill refinement trains LoRA on linear and conv layers, not {type(mod).__name__}")
            up = m.factors["up"].float()
            down = m.factors["down"].float()
            if isinstance(mod, torch.nn.Linear):
                up, down = up.reshape(mod.weight.shape[0], -1), down.reshape(-1, mod.weight.shape[1])
            else:  # conv: down carries the kernel, up is 1x1
                up = up.reshape(mod.weight.shape[0], -1, 1, 1)
                down = down.reshape(-1, *mod.weight.shape[1:])
            pu = torch.nn.Parameter(up.clone().to(device))
            pd = torch.nn.Parameter(down.clone().to(device))
            self.params[key] = (pu, pd)
            self.handles.append(mod.register_forward_hook(_hook(pu, pd, m.scale)))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for pair in self.params.values() for p in pair]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def into(self, lora: Lora) -> Lora:
        """A copy of ``lora`` whose trained modules carry the current factors (in their stored dtype)."""
        modules = dict(lora.modules)
        for key, (up, down) in self.params.items():
            m = lora.modules[key]
            dtype = DTYPES[m.factors["up"].dtype][0]
            factors = dict(m.factors)
            factors["up"] = LazyTensor.from_torch(up.detach().cpu().reshape(m.factors["up"].shape).to(dtype).contiguous())
            factors["down"] = LazyTensor.from_torch(down.detach().cpu().reshape(m.factors["down"].shape).to(dtype).contiguous())
            modules[key] = Module(m.component, m.name, m.kind, factors, m.alpha, m.dora_scale, m.weight_shape, list(m.source_keys))
        return Lora(family=lora.family, modules=modules, metadata=dict(lora.metadata), format_state=lora.format_state,
                    source_path=lora.source_path, source_sha256=lora.source_sha256,
                    source_hashes=lora.source_hashes)


def _hook(up: torch.nn.Parameter, down: torch.nn.Parameter, scale: float):
    def linear(mod, inp, out):
        return out + scale * F.linear(F.linear(inp[0].to(down.dtype), down), up).to(out.dtype)

    def conv(mod, inp, out):
        h = F.conv2d(inp[0].to(down.dtype), down, stride=mod.stride, padding=mod.padding, dilation=mod.dilation)
        return out + scale * F.conv2d(h, up).to(out.dtype)

    return linear if up.ndim == 2 else conv
