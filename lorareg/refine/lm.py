"""Data-free self-distillation of a ported LoRA onto a causal language model.

teacher = source base + source LoRA (ΔW merged into the weights); samples of ``sample_length``
tokens are drawn from it once at temperature 1 (prompt: BOS, or a few random tokens when the
config has none) and its next-token log-probabilities are stored for every position. The teacher
is then freed, and the student (target base, frozen, with the ported LoRA's factors as trainable
fp32 parameters added through forward hooks) is trained on KL(teacher || student) with AdamW.

Teacher distributions are stored in full when the vocabulary is small (<= ``FULL_VOCAB_MAX``
entries, e.g. byte-level models); for larger vocabularies the top-``TOP_K`` log-probs are kept and
the rest of the mass becomes one "remainder" bucket on both sides of the KL.

Samples are cached on disk (safetensors, no pickle) under the lorareg cache folder, keyed by the
source model's weight files, the source LoRA's content, the sample settings and the seed, so
porting one LoRA to several targets generates them once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

import torch

from ..core.errors import InputError
from ..core.lora import Lora
from .hooks import TrainableLora, merge
from .options import RefineJob, RefineOptions
from .report import RefineReportBase
from .runtime import load_causal_lm
from .train import Shuffled, thin, train_factors
from .samples_cache import cached, lora_digest, model_digest

PathLike = Union[str, Path]
FULL_VOCAB_MAX = 4096
TOP_K = 64
SAMPLES_VERSION = 1
DEFAULT_LR = 2e-3
DEFAULT_BATCH = 16
DEFAULT_SAMPLES = 64


class RefineReport(RefineReportBase):
    model: str = "language model"
    loss: str = "kl"
    sample_length: int
    kl_start: float
    kl_end: float
    kl_history: list[list[float]] = []
    teacher_storage: str


# ---------------------------------------------------------------- models


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _load(folder: PathLike, device: torch.device):
    return load_causal_lm(folder, dtype=_dtype(device)).to(device)


# ---------------------------------------------------------------- teacher samples


def _cache_arg(model) -> str:
    """The forward argument carrying the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _past(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


@torch.no_grad()
def _generate(model, n: int, length: int, seed: int, device: torch.device, batch: int = 64) -> torch.Tensor:
    cfg = model.config
    vocab = int(cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    bos = getattr(cfg, "bos_token_id", None)
    rows = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        if bos is not None and 0 <= int(bos) < vocab:
            prompt = torch.full((b, 1), int(bos), dtype=torch.long)
        else:
            prompt = torch.randint(0, vocab, (b, min(4, length)), generator=g)
        seq = prompt.to(device)
        out = model(input_ids=seq, use_cache=True)
        past, logits = _past(out), out.logits[:, -1]
        while seq.shape[1] < length:
            probs = torch.softmax(logits.float(), dim=-1).cpu()
            nxt = torch.multinomial(probs, 1, generator=g).to(device)
            seq = torch.cat([seq, nxt], dim=1)
            if seq.shape[1] == length:
                break
            out = model(input_ids=nxt, use_cache=True, **{_cache_arg(model): past})
            past, logits = _past(out), out.logits[:, -1]
        rows.append(seq.cpu())
    return torch.cat(rows)


@torch.no_grad()
def _teacher_targets(model, ids: torch.Tensor, device: torch.device, batch: int = 16) -> dict[str, torch.Tensor]:
    vocab = int(model.config.vocab_size)
    full = vocab <= FULL_VOCAB_MAX
    logps, idxs = [], []
    for i in range(0, ids.shape[0], batch):
        x = ids[i : i + batch].to(device)
        lp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), dim=-1)
        if full:
            logps.append(lp.cpu())
        else:
            v, k = lp.topk(TOP_K, dim=-1)
            logps.append(v.cpu())
            idxs.append(k.to(torch.int32).cpu())
    out = {"ids": ids, "logp": torch.cat(logps)}
    if idxs:
        out["idx"] = torch.cat(idxs)
    return out


def teacher_samples(source_model: PathLike, source_lora: Lora, *, samples: int, sample_length: int, seed: int,
                    device: torch.device, cache_dir: Optional[PathLike] = None) -> tuple[dict[str, torch.Tensor], bool]:
    """(samples and the teacher's log-probs, whether they came from the cache)."""
    folder = Path(source_model)
    key = {"v": SAMPLES_VERSION, "model": model_digest(folder), "lora": lora_digest(source_lora), "samples": samples, "dtype": str(_dtype(device)),
           "length": sample_length, "seed": seed, "full_max": FULL_VOCAB_MAX, "top_k": TOP_K}

    def make() -> dict[str, torch.Tensor]:
        teacher = _load(folder, device)
        merge(teacher, source_lora.modules)
        ids = _generate(teacher, samples, sample_length, seed, device)
        return _teacher_targets(teacher, ids, device)

    return cached(cache_dir, "distill-samples", key, make)


# ---------------------------------------------------------------- student


def _kl(student_logits: torch.Tensor, logp_t: torch.Tensor, idx: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over positions of KL(teacher || student)."""
    lq = torch.log_softmax(student_logits.float(), dim=-1)
    if idx is None:
        return (logp_t.exp() * (logp_t - lq)).sum(-1).mean()
    lq_k = lq.gather(-1, idx.long())
    p_k = logp_t.exp()
    r_t = (1 - p_k.sum(-1)).clamp_min(1e-8)
    r_s = (1 - lq_k.exp().sum(-1)).clamp_min(1e-8)
    return ((p_k * (logp_t - lq_k)).sum(-1) + r_t * (r_t.log() - r_s.log())).mean()


@torch.no_grad()
def _kl_all(model, data: dict[str, torch.Tensor], device: torch.device, batch: int = 16) -> float:
    total, n = 0.0, 0
    ids, logp, idx = data["ids"], data["logp"], data.get("idx")
    for i in range(0, ids.shape[0], batch):
        x = ids[i : i + batch].to(device)
        kl = _kl(model(input_ids=x).logits[:, :-1], logp[i : i + batch].to(device), None if idx is None else idx[i : i + batch].to(device))
        total += float(kl) * x.shape[0]
        n += x.shape[0]
    return total / n


def refine_lm(ported: Lora, job: RefineJob, options: RefineOptions) -> tuple[Lora, RefineReport]:
    """Refine ``ported`` (a LoRA on the job's target model) by distilling the source model + source LoRA."""
    o = options
    steps, sample_length, seed, budget_seconds = o.steps, o.sample_length, o.seed, o.budget_seconds
    samples = DEFAULT_SAMPLES if o.samples is None else o.samples
    batch = DEFAULT_BATCH if o.batch is None else o.batch
    source_model, target_model, source_lora = job.source_model, job.target_model, job.source_lora
    device, progress, start_method, cache_dir = job.device, job.progress, job.start_method, job.cache_dir
    lr = o.lr
    if steps < 0 or samples < 1 or sample_length < 2 or batch < 1:
        raise InputError("distill needs steps >= 0, samples >= 1, sample length >= 2, batch >= 1")
    lr = DEFAULT_LR if lr is None else float(lr)
    dev = torch.device(device)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    data, from_cache = teacher_samples(source_model, source_lora, samples=samples, sample_length=sample_length, seed=seed,
                                       device=dev, cache_dir=cache_dir)
    t_sample = time.perf_counter() - t0

    t1 = time.perf_counter()
    student = _load(target_model, dev)
    for p in student.parameters():
        p.requires_grad_(False)
    if int(student.config.vocab_size) != data["logp"].shape[-1] and "idx" not in data:
        raise InputError(f"vocabulary sizes differ: teacher {data['logp'].shape[-1]}, student {student.config.vocab_size}")
    hooks = TrainableLora(student, ported.modules, dev)
    params = hooks.parameters()
    kl_start = _kl_all(student, data, dev)
    batches = Shuffled(data["ids"].shape[0], batch, seed + 1)

    def loss_at(step: int) -> torch.Tensor:
        sel = batches()
        idx = data["idx"][sel].to(dev) if "idx" in data else None
        return _kl(student(input_ids=data["ids"][sel].to(dev)).logits[:, :-1], data["logp"][sel].to(dev), idx)

    done, history, stopped = train_factors(params, loss_at, steps=steps, lr=lr, started=t0, budget_seconds=budget_seconds,
                                           progress=progress, desc="distill", loss_name="kl")
    kl_end = _kl_all(student, data, dev)
    hooks.remove()

    kept = kl_end > kl_start  # never hand back a LoRA further from the teacher than the projection was
    refined = ported if kept else hooks.into(ported)
    t_train = time.perf_counter() - t1
    report = RefineReport(
        steps=done, steps_requested=steps, samples=samples, sample_length=sample_length, batch=batches.batch, lr=lr, start_method=start_method,
        kl_start=round(kl_start, 6), kl_end=round(kl_end, 6), kl_history=thin(history),
        teacher_storage="full" if "idx" not in data else f"top-{TOP_K}+remainder", samples_cached=from_cache,
        sample_s=round(t_sample, 3), train_s=round(t_train, 3), wall_s=round(time.perf_counter() - t0, 3), device=str(dev),
        dtype=str(_dtype(dev)).replace("torch.", ""), seed=seed, stopped_by_budget=stopped, kept_projection=kept,
    )
    return refined, report
