"""Build LoRA files with real family shapes for tests (random factors, chosen modules)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import torch

import lorareg
from lorareg.io import LazyTensor
from lorareg.lora import FormatState, Lora, Module
from lorareg.registry import get_registry


TEST_DATA = Path(__file__).parent / "data"


def tiny_family_config(family: str, component: str) -> dict:
    """The architecture config of a test family (read with tests/data on the registry path)."""
    import os

    old = os.environ.get("LORAREG_DATA_PATH")
    os.environ["LORAREG_DATA_PATH"] = str(TEST_DATA)
    try:
        return dict(get_registry().family(family).components[component].spec.architecture.config)
    finally:
        if old is None:
            os.environ.pop("LORAREG_DATA_PATH", None)
        else:
            os.environ["LORAREG_DATA_PATH"] = old


def make_lora(
    family: str,
    select: Callable[[str, str], bool] | str,
    *,
    rank: int = 4,
    alpha: Optional[float] = 2.0,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    conv: bool = True,
) -> Lora:
    """A plain LoRA on every module where select(component, name) holds (a regex matches 'component:name')."""
    if isinstance(select, str):
        pattern = re.compile(select)
        select = lambda c, n: bool(pattern.search(f"{c}:{n}"))  # noqa: E731
    fam = get_registry().family(family)
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for cid, comp in fam.components.items():
        for name, shape in comp.modules.items():
            if not select(cid, name) or (len(shape) != 2 and not conv) or len(shape) not in (2, 4):
                continue
            if len(shape) == 4:
                down = torch.randn(rank, shape[1], shape[2], shape[3], generator=g)
                up = torch.randn(shape[0], rank, 1, 1, generator=g)
            else:
                down = torch.randn(rank, shape[1], generator=g)
                up = torch.randn(shape[0], rank, generator=g)
            m = Module(cid, name, "lora", {"down": LazyTensor.from_torch(down.to(dtype)), "up": LazyTensor.from_torch(up.to(dtype))}, alpha, None, shape)
            modules[m.key] = m
    assert modules, "selection matched no module"
    return Lora(family=fam.id, modules=modules, format_state=None)


def write(lora: Lora, path: Path, fmt: str, variant: Optional[str] = None, **kw) -> Path:
    lorareg.save(lora, path, format=fmt, variant=variant, **kw)
    return path


def max_delta_error(a: Lora, b: Lora) -> float:
    assert set(a.modules) == set(b.modules), (set(a.modules) ^ set(b.modules))
    worst = 0.0
    for key, m in a.modules.items():
        da, db = m.delta_weight(), b.modules[key].delta_weight()
        assert da.shape == db.shape, key
        worst = max(worst, float((da - db).abs().max() / (da.abs().max() + 1e-12)))
    return worst
