"""Build LoRA files with real family shapes for tests (random factors, chosen modules)."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Callable, Optional

import torch

import lorareg
from lorareg.core.io import LazyTensor
from lorareg.core.lora import FormatState, Lora, Module
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


def ssd_like(sdxl, ssd, kept: list[int], noise: float = 0.01):
    """``ssd`` (a tiny-ssd UNet) loaded from ``sdxl`` (a tiny-sdxl one) the way SSD-1B was made: of each shortened
    attention's transformer blocks only ``kept`` remain; every weight is the teacher's plus a little noise."""
    sa, sb = sdxl.state_dict(), ssd.state_dict()
    for k in sb:
        src = k
        m = re.match(r"(down_blocks\.1\.attentions\.\d+\.transformer_blocks\.|up_blocks\.0\.attentions\.\d+\.transformer_blocks\.)(\d+)(\..*)", k)
        if m:
            src = m.group(1) + str(kept[int(m.group(2))]) + m.group(3)
        if src in sa and sa[src].shape == sb[k].shape:
            sb[k] = sa[src] + noise * torch.randn_like(sa[src])
    ssd.load_state_dict(sb)
    return ssd


def clip_tokenizer_folder(path: Path) -> None:
    """A CLIP BPE tokenizer with a tiny character vocabulary (78 symbols + BOS/EOS), as diffusers pipelines store it."""
    path.mkdir(parents=True)
    chars = list(string.ascii_lowercase + string.digits + ",.!")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 78, "<|endoftext|>": 79})
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 16, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


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
