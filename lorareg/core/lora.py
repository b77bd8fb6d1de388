"""The in-memory LoRA: canonical modules with their factors, rank, alpha and scale.

Every format is read into this one model and written from it, so ΔW of a module is computed here,
once, whatever format the file came in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from pydantic import BaseModel, Field

from .io import LazyTensor
from .names import numel

AdapterType = Literal["lora", "loha", "lokr", "full"]

# Factor roles of each adapter type (names follow the LyCORIS/kohya vocabulary).
FACTOR_ROLES: dict[str, tuple[str, ...]] = {
    "lora": ("down", "up", "mid"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff", "diff_b"),
}
REQUIRED_ROLES: dict[str, tuple[tuple[str, ...], ...]] = {
    # each inner tuple: one of these must be present
    "lora": (("down",), ("up",)),
    "loha": (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
    "full": (("diff",),),
}


def display_type(kind: str, factors: dict) -> str:
    """The name users know: LoCon is plain LoRA on a convolution."""
    if kind == "lora" and len(factors["down"].shape) == 4:
        return "locon"
    return kind


@dataclass
class Module:
    """One adapted module of the base model, under its canonical name."""

    component: str
    name: str
    kind: AdapterType
    factors: dict[str, LazyTensor]
    alpha: Optional[float] = None  # None: the format stored none (scale 1)
    dora_scale: Optional[LazyTensor] = None
    weight_shape: Optional[tuple[int, ...]] = None  # the base weight's shape, when the family is known
    source_keys: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.component}:{self.name}"

    @property
    def rank(self) -> Optional[int]:
        f = self.factors
        if self.kind == "lora":
            return f["down"].shape[0]
        if self.kind == "loha":
            return f["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            for role in ("lokr_w2_b", "lokr_w1_b"):
                if role in f:
                    return f[role].shape[0]
        return None

    @property
    def scale(self) -> float:
        """Multiplier of the factor product: alpha / rank (1 when either is absent)."""
        r = self.rank
        if self.alpha is None or r is None:
            return 1.0
        return self.alpha / r

    @property
    def dtype(self) -> str:
        return next(iter(self.factors.values())).dtype

    @property
    def type_name(self) -> str:
        return display_type(self.kind, self.factors)

    def delta_weight(self) -> torch.Tensor:
        """Dense ΔW in fp32 (small or test-sized modules; the engine never calls this)."""
        f = {k: v.float() for k, v in self.factors.items()}
        if self.kind == "lora":
            dw = _lora_product(f)
        elif self.kind == "loha":
            dw = _hada(f, "1") * _hada(f, "2")
        elif self.kind == "lokr":
            dw = _kron(f)
        else:
            dw = f["diff"]
        if self.weight_shape is not None and dw.numel() == numel(self.weight_shape):
            dw = dw.reshape(self.weight_shape)
        return dw * self.scale


def _lora_product(f: dict[str, torch.Tensor]) -> torch.Tensor:
    down, up = f["down"], f["up"]
    if "mid" in f:  # Tucker: up[o,a] · mid[a,b,kh,kw] · down[b,i]
        return torch.einsum("oa,abhw,bi->oihw", up.flatten(1), f["mid"], down.flatten(1))
    dw = up.flatten(1) @ down.flatten(1)
    if down.dim() == 4:
        dw = dw.reshape(up.shape[0], *down.shape[1:])
    return dw


def _hada(f: dict[str, torch.Tensor], i: str) -> torch.Tensor:
    a, b = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]
    t = f.get(f"hada_t{i}")
    if t is not None:  # a: [r, out], b: [r, in], t: [r, r, kh, kw]
        return torch.einsum("ij...,jr,ip->pr...", t, b, a)
    return a @ b


def _kron(f: dict[str, torch.Tensor]) -> torch.Tensor:
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:  # a: [r, b], b: [r, d], t: [r, r, kh, kw]
        w2 = torch.einsum("ij...,ip,jr->pr...", f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"].flatten(1)
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2)


class FormatState(BaseModel):
    """How a file spelled things, so that writing the same format again reproduces it."""

    format: str
    variant: str
    schemes: dict[str, str] = Field(default_factory=dict)  # component -> naming scheme
    prefixes: dict[str, str] = Field(default_factory=dict)  # component -> key prefix
    spellings: dict[str, int] = Field(default_factory=dict)  # "component/role" -> suffix index
    alpha_dtype: Optional[str] = None
    extra: dict[str, object] = Field(default_factory=dict)


@dataclass
class Lora:
    """A loaded adapter: canonical modules of one family, plus the file's metadata."""

    family: Optional[str]
    modules: dict[str, Module]  # key "component:name"
    metadata: dict[str, str] = field(default_factory=dict)
    format_state: Optional[FormatState] = None
    source_path: Optional[str] = None
    source_sha256: Optional[str] = None
    #: the source file's hashes (lorareg.core.hashes.FileHashes as a dict), recorded as lorareg.source_*
    source_hashes: Optional[dict[str, str]] = None
    unmapped: dict[str, str] = field(default_factory=dict)  # input key -> reason it has no module

    @property
    def components(self) -> list[str]:
        return sorted({m.component for m in self.modules.values()})

    @property
    def adapter_types(self) -> list[str]:
        return sorted({m.type_name for m in self.modules.values()})

    def ranks(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.modules.values():
            key = str(m.rank)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def alphas(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for m in self.modules.values():
            key = "none" if m.alpha is None else _fmt_num(m.alpha)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def delta_weight(self, key: str) -> torch.Tensor:
        return self.modules[key].delta_weight()


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))
