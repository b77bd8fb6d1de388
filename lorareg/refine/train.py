"""The optimisation loop shared by the refinements: AdamW on the LoRA factors, warm-up then cosine decay."""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

MIN_LR_FRACTION = 0.1


def train_factors(params: list[torch.nn.Parameter], loss_at: Callable[[int], torch.Tensor], *, steps: int, lr: float,
                  started: float, budget_seconds: Optional[float], progress: bool, desc: str, loss_name: str) -> tuple[int, list[list[float]], bool]:
    """Run up to ``steps`` steps of ``loss_at(step).backward()``; (steps done, [[step, loss]], stopped by the budget).

    ``started`` is the perf_counter time the budget counts from (sampling included).
    """
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    bar = None
    if progress and steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=desc, unit="step", leave=False)
    history: list[list[float]] = []
    done, stopped = 0, False
    warmup = max(1, min(10, steps // 10))
    for step in range(steps):
        if budget_seconds is not None and time.perf_counter() - started > budget_seconds:
            stopped = True
            break
        f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        for group in opt.param_groups:
            group["lr"] = lr * max(f, MIN_LR_FRACTION)
        loss = loss_at(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done += 1
        value = float(loss.detach())
        history.append([step, round(value, 6)])
        if bar:
            bar.update(1)
            bar.set_postfix({loss_name: f"{value:.4f}"})
    if bar:
        bar.close()
    return done, history, stopped


@torch.no_grad()
def mean_loss(n: int, batch: int, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """The mean of ``loss_of(rows)`` over rows 0 .. n-1, taken ``batch`` rows at a time (weighted by batch size)."""
    return sum(float(loss_of(torch.arange(i, min(n, i + batch)))) * (min(n, i + batch) - i) for i in range(0, n, batch)) / n


def thin(history: list[list[float]], points: int = 50) -> list[list[float]]:
    """About ``points`` entries of a loss history, for the report."""
    return history[:: max(1, len(history) // points)]


class Shuffled:
    """Batches of indices into ``n`` examples: each epoch a fresh permutation, reproducible from a seed."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, min(batch, n)
        self.g = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.g), 0

    def __call__(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.g), 0
        sel = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return sel
