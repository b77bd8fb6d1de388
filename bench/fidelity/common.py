"""Shared pieces of the fidelity benchmark: hand-written LoRA training hooks, porting, gains."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F

import lorareg
from lorareg.core.io import LazyTensor
from lorareg.core.lora import Lora, Module

HERE = Path(__file__).resolve().parent
DATA_ROOT = HERE / "data"


class LoraHooks:
    """A plain LoRA (ΔW = alpha/r · B A, B initialised to zero) on named nn.Linear layers, via forward hooks.

    The benchmark trains LoRAs from scratch as a trainer would; lorareg.refine.hooks.TrainableLora only
    continues an existing LoRA's factors, so it is not reused here.
    """

    def __init__(self, model: torch.nn.Module, names: Iterable[str], rank: int, alpha: float, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.names = list(names)
        self.A: dict[str, torch.nn.Parameter] = {}
        self.B: dict[str, torch.nn.Parameter] = {}
        self.shapes: dict[str, tuple[int, int]] = {}
        self.handles = []
        for name in self.names:
            mod = model.get_submodule(name)
            m, n = mod.weight.shape
            self.A[name] = torch.nn.Parameter(torch.randn(rank, n, generator=g) / math.sqrt(n))
            self.B[name] = torch.nn.Parameter(torch.zeros(m, rank))
            self.shapes[name] = (m, n)
            self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(mod, inp, out):
            return out + self.scale * F.linear(F.linear(inp[0], self.A[name]), self.B[name])

        return hook

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for n in self.names for p in (self.A[n], self.B[n])]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def to_lora(self, family: str, component: str, dtype: torch.dtype = torch.float32) -> Lora:
        modules = {}
        for n in self.names:
            m = Module(component, n, "lora",
                       {"down": LazyTensor.from_torch(self.A[n].detach().to(dtype).contiguous()),
                        "up": LazyTensor.from_torch(self.B[n].detach().to(dtype).contiguous())},
                       float(self.alpha), None, self.shapes[n])
            modules[m.key] = m
        return Lora(family=family, modules=modules, format_state=None)


@contextmanager
def with_deltas(model: torch.nn.Module, deltas: dict[str, torch.Tensor]):
    params = dict(model.named_parameters())
    saved = {}
    try:
        with torch.no_grad():
            for name, dw in deltas.items():
                saved[name] = params[name].detach().clone()
                params[name].add_(dw.to(params[name].dtype).reshape(params[name].shape))
        yield model
    finally:
        with torch.no_grad():
            for name, w in saved.items():
                params[name].copy_(w)


def deltas_of(lora: Lora, keep: Optional[set] = None) -> dict[str, torch.Tensor]:
    """Dense ΔW per parameter name (module name + '.weight'); ``keep``: only these module keys."""
    return {m.name + ".weight": m.delta_weight() for k, m in lora.modules.items() if keep is None or k in keep}


def gain(none: float, loss: float, ref: float) -> float:
    # lorareg.evaluate.gain returns None for a reference that gains nothing (an API value); the benchmark
    # keeps NaN instead so its averages, ratios and plots need no special case
    d = none - ref
    return float("nan") if abs(d) < 1e-12 else (none - loss) / d


def port(lora, src_dir: Path, tgt_dir: Path, method: str, out: Path, **kw):
    """lorareg.port with weights on both sides; returns (ported Lora read back from disk, report).

    Subspace similarities of every layer (the threshold sweeps and the flag use them): the bases check,
    also for copy, whose default is the streamed weight check.
    """
    t0 = time.perf_counter()
    kw.setdefault("check", "bases")
    res = lorareg.port(lora, source_model=str(src_dir), target_model=str(tgt_dir), method=method, output=out,
                       force=True, progress=False, device="cpu", **kw)
    fam = res.report.target_model.family
    ported = lorareg.load(out, family=fam)
    return ported, res.report, time.perf_counter() - t0


def layer_similarities(report) -> dict[str, float]:
    return {l.source: l.similarity for l in report.layers if l.similarity is not None}


def weight_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """‖W_b − W_a‖ / ‖W_a‖ over the 2-D weights both share."""
    num = den = 0.0
    for k, w in a.items():
        if w.ndim == 2 and k in b and b[k].shape == w.shape:
            num += float((b[k].float() - w.float()).pow(2).sum())
            den += float(w.float().pow(2).sum())
    return math.sqrt(num / den) if den else float("nan")


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)


def digits() -> dict[str, torch.Tensor]:
    """scikit-learn's 8x8 digits in [-1, 1] (background -1): 1500 to train on, 297 held out, split by a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # [-1, 1], background -1
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, ho = perm[:1500], perm[1500:]
    return {"x": x[tr], "y": y[tr], "x_heldout": x[ho], "y_heldout": y[ho]}


def fit(model, params, loss_at: Callable[[], torch.Tensor], steps: int, lr: float, warmup: int = 20,
        betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """Train ``params`` for ``steps`` steps of ``loss_at()``: AdamW, linear warm-up then cosine decay to 5% of ``lr``,
    gradient norm clipped at 1; the model in train mode meanwhile. The last step's loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=betas)
    model.train()
    last = float("nan")
    for step in range(steps):
        f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        for group in opt.param_groups:
            group["lr"] = lr * max(f, 0.05)
        loss = loss_at()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = float(loss.detach())
    model.eval()
    return last
