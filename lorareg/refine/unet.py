"""Data-free self-distillation of a ported LoRA onto a diffusion UNet.

teacher = source UNet + source LoRA (ΔW merged, text encoders too). It first makes its own clean
latents: ``samples`` DDIM runs of ``sampler_steps`` steps from noise, conditioned on prompts (see
lorareg.refine.conditioning) with classifier-free guidance. Each latent is noised at ``noisings``
random timesteps and the teacher's prediction (ε or v) for each is stored; then the teacher is
freed. The student (target UNet, frozen, the ported LoRA's UNet factors trainable through forward
hooks) is trained on the MSE between its predictions and the teacher's, on the same noisy latents
and its own text embeddings of the same prompts.

Both UNets must share latent space, text encoders and prediction type (sdxl -> ssd-1b, sdxl ->
segmind-vega: the pairs those models were distilled on); the caller checks that first.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..core.errors import InputError
from ..core.lora import Lora
from ..registry.families import Family
from .conditioning import TextConditioner, component_folder, metadata_prompts
from .hooks import TrainableLora, merge, modules_of
from .options import RefineJob, RefineOptions
from .report import RefineReportBase
from .runtime import load_diffusers_model
from .noise import Schedule, add_noise, alphas_cumprod, ddim_sample, read_schedule
from .samples_cache import cached, lora_digest, model_digest, tensor_digest
from .train import Shuffled, mean_loss, thin, train_factors

PathLike = Union[str, Path]
SAMPLES_VERSION = 2
DEFAULT_LR = 1e-3
DEFAULT_BATCH = 4
DEFAULT_SAMPLES = 64
DEFAULT_GUIDANCE = 5.0
#: above this many parameters the student recomputes activations in the backward pass (SDXL-sized UNets)
CHECKPOINT_ABOVE = 300_000_000


class UnetRefineReport(RefineReportBase):
    model: str = "diffusion unet"
    loss: str = "mse"
    noisings: int
    latent_size: int
    sampler_steps: int
    guidance: float
    prompts: int
    prompts_from: str
    prediction_type: str
    mse_start: float
    mse_end: float
    mse_history: list[list[float]] = []


def load_unet(family: Family, folder: Path, dtype: torch.dtype):
    """The family's UNet from a diffusers folder (config.json + safetensors weights), frozen, in eval mode."""
    arch = family.components["unet"].spec.architecture
    return load_diffusers_model(arch.class_, component_folder(family, folder, "unet"), dtype, f"{family.id} UNet")


class _Conditions:
    """Per-prompt conditioning tensors for one UNet, plus the extra inputs its config asks for."""

    def __init__(self, unet, tensors: dict[str, torch.Tensor], latent_size: int, vae_scale: int):
        self.hidden = tensors["encoder_hidden_states"]
        cfg = unet.config
        self.text_time = cfg.get("addition_embed_type") == "text_time"
        if self.text_time:
            pooled_dim = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])
            pooled = tensors.get("text_embeds")
            self.pooled = pooled if pooled is not None else torch.zeros(self.hidden.shape[0], pooled_dim)
            px = latent_size * vae_scale
            # SDXL size conditioning: original size, crop top-left, target size
            self.time_ids = torch.tensor([px, px, 0, 0, px, px], dtype=torch.float32)

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def kwargs(self, idx: torch.Tensor, device: torch.device, dtype: torch.dtype) -> dict:
        out = {"encoder_hidden_states": self.hidden[idx].to(device, dtype)}
        if self.text_time:
            out["added_cond_kwargs"] = {"text_embeds": self.pooled[idx].to(device, dtype),
                                        "time_ids": self.time_ids.expand(len(idx), 6).to(device, dtype)}
        return out


def _unconditional(unet) -> dict[str, torch.Tensor]:
    """A zero context for a UNet without text encoders (e.g. a class-conditioned one given no conditions)."""
    dim = unet.config.get("encoder_hid_dim") or unet.config["cross_attention_dim"]
    return {"encoder_hidden_states": torch.zeros(1, 1, int(dim))}


def _conditioning(family: Family, folder: Path, lora: Optional[Lora], unet, prompts: list[str], conditions: Optional[torch.Tensor],
                  device: torch.device, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]]]:
    """(conditioning of each prompt, the unconditional one for guidance or None)."""
    if conditions is not None:
        return {"encoder_hidden_states": conditions.float()}, None
    text = TextConditioner(family, folder, lora, device, dtype)
    if not text.enabled:
        return _unconditional(unet), None
    enc = text.encode(list(prompts) + [""])
    cond = {k: v[:-1] for k, v in enc.items()}
    uncond = {k: v[-1:] for k, v in enc.items()}
    return cond, uncond


def _teacher_data(src_fam: Family, src_folder: Path, source_lora: Lora, prompts: list[str], conditions: Optional[torch.Tensor], *,
                  samples: int, noisings: int, latent_size: int, sampler_steps: int, guidance: float, sched: Schedule, seed: int,
                  device: torch.device, dtype: torch.dtype, progress: bool) -> dict[str, torch.Tensor]:
    unet = load_unet(src_fam, src_folder, dtype)
    merge(unet, modules_of(source_lora, "unet"))
    # the text encoders run (and are freed) before the UNet moves to the device
    cond_t, uncond_t = _conditioning(src_fam, src_folder, source_lora, unet, prompts, conditions, device, dtype)
    unet.to(device)
    cond = _Conditions(unet, cond_t, latent_size, src_fam.spec.diffusion.vae_scale_factor)
    uncond = _Conditions(unet, uncond_t, latent_size, src_fam.spec.diffusion.vae_scale_factor) if uncond_t and guidance != 1.0 else None
    ac = alphas_cumprod(sched)
    g = torch.Generator().manual_seed(seed)
    channels = int(unet.config["in_channels"])
    which = torch.arange(samples) % len(cond)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=samples, desc="teacher samples", unit="latent", leave=False)
    xs, ts, ps, targets = [], [], [], []
    chunk = 8
    for start in range(0, samples, chunk):
        idx = which[start : start + chunk]
        noise = torch.randn(len(idx), channels, latent_size, latent_size, generator=g)

        def denoise(x: torch.Tensor, t: torch.Tensor, idx=idx) -> torch.Tensor:
            x, t = x.to(device, dtype), t.to(device)
            out = unet(x, t, **cond.kwargs(idx, device, dtype)).sample.float()
            if uncond is not None:
                zero = torch.zeros(len(idx), dtype=torch.long)
                out_u = unet(x, t, **uncond.kwargs(zero, device, dtype)).sample.float()
                out = out_u + guidance * (out - out_u)
            return out.cpu()

        x0 = ddim_sample(denoise, noise, sampler_steps, sched, ac)
        for _ in range(noisings):
            t = torch.randint(0, sched.num_train_timesteps, (len(idx),), generator=g)
            xt = add_noise(x0, torch.randn(x0.shape, generator=g), t, ac).float()
            with torch.no_grad():
                pred = unet(xt.to(device, dtype), t.to(device), **cond.kwargs(idx, device, dtype)).sample.float().cpu()
            xs.append(xt), ts.append(t), ps.append(idx), targets.append(pred)
        if bar:
            bar.update(len(idx))
    if bar:
        bar.close()
    return {"xt": torch.cat(xs), "t": torch.cat(ts), "prompt": torch.cat(ps), "target": torch.cat(targets)}


def refine_unet(ported: Lora, job: RefineJob, options: RefineOptions) -> tuple[Lora, UnetRefineReport]:
    """Refine ``ported`` (a LoRA on the job's target UNet) by distilling the source model + source LoRA.

    ``options.prompts``: text prompts (default: from the LoRA's metadata, else the empty prompt).
    ``options.conditions``: instead of prompts, the context tensors themselves [P, L, D] (UNets without text encoders).
    """
    o = options
    steps, noisings, latent_size, sampler_steps = o.steps, o.noisings, o.latent_size, o.sampler_steps
    samples = DEFAULT_SAMPLES if o.samples is None else o.samples
    guidance, prompts, conditions, lr, seed, budget_seconds = o.guidance, o.prompts, o.conditions, o.lr, o.seed, o.budget_seconds
    batch = DEFAULT_BATCH if o.batch is None else o.batch
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance
    source_family, target_family, source_lora = job.source_family, job.target_family, job.source_lora
    source_model, target_model = job.source_model, job.target_model
    device, progress, start_method, cache_dir = job.device, job.progress, job.start_method, job.cache_dir
    if steps < 0 or samples < 1 or noisings < 1 or sampler_steps < 1 or batch < 1:
        raise InputError("distill needs steps >= 0, samples >= 1, noisings >= 1, sampler steps >= 1, batch >= 1")
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    lr = DEFAULT_LR if lr is None else float(lr)
    src_folder, tgt_folder = Path(source_model), Path(target_model)
    spec = source_family.spec.diffusion
    sched = read_schedule(src_folder, spec)
    tgt_sched = read_schedule(tgt_folder, target_family.spec.diffusion)
    if tgt_sched.prediction_type != sched.prediction_type:
        raise InputError(f"the UNets predict different things ({sched.prediction_type} vs {tgt_sched.prediction_type}); "
                         "distillation needs the same prediction type on both sides")
    size = latent_size or int(source_family.components["unet"].spec.architecture.config.get("sample_size") or 64)
    if prompts:
        prompt_list, prompts_from = list(prompts), "--prompts"
    elif conditions is not None:
        prompt_list, prompts_from = [], f"{conditions.shape[0]} given condition tensors"
    else:
        prompt_list, prompts_from = metadata_prompts(source_lora.metadata, samples, seed)
        if not prompt_list:
            prompt_list, prompts_from = [""], "the empty prompt (no --prompts, no trigger words or tags in the LoRA's metadata)"
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    key = {"v": SAMPLES_VERSION, "model": model_digest(src_folder), "lora": lora_digest(source_lora), "samples": samples,
           "noisings": noisings, "size": size, "sampler_steps": sampler_steps, "guidance": guidance, "seed": seed,
           "schedule": sched.model_dump(exclude={"source"}), "dtype": str(dtype),
           "prompts": hashlib.sha256("\n".join(prompt_list).encode()).hexdigest(),
           "conditions": tensor_digest(conditions) if conditions is not None else None}
    data, from_cache = cached(cache_dir, "distill-latents", key, lambda: _teacher_data(
        source_family, src_folder, source_lora, prompt_list, conditions, samples=samples, noisings=noisings, latent_size=size,
        sampler_steps=sampler_steps, guidance=guidance, sched=sched, seed=seed, device=dev, dtype=dtype, progress=progress))
    t_sample = time.perf_counter() - t0

    t1 = time.perf_counter()
    student = load_unet(target_family, tgt_folder, dtype)
    cond_s, _ = _conditioning(target_family, tgt_folder, ported, student, prompt_list, conditions, dev, dtype)
    student.to(dev)
    cond = _Conditions(student, cond_s, size, target_family.spec.diffusion.vae_scale_factor)
    hooks = TrainableLora(student, modules_of(ported, "unet"), dev)
    if not hooks.params:
        raise InputError("the ported LoRA has no UNet module; there is nothing for UNet distillation to refine")
    if dev.type == "cuda" and sum(p.numel() for p in student.parameters()) > CHECKPOINT_ABOVE and hasattr(student, "enable_gradient_checkpointing"):
        student.enable_gradient_checkpointing()
    params = hooks.parameters()

    def mse(sel: torch.Tensor) -> torch.Tensor:
        pred = student(data["xt"][sel].to(dev, dtype), data["t"][sel].to(dev), **cond.kwargs(data["prompt"][sel], dev, dtype)).sample
        return F.mse_loss(pred.float(), data["target"][sel].to(dev).float())

    def mse_all() -> float:
        return mean_loss(data["t"].shape[0], batch, mse)

    mse_start = mse_all()
    batches = Shuffled(data["t"].shape[0], batch, seed + 1)
    done, history, stopped = train_factors(params, lambda step: mse(batches()), steps=steps, lr=lr, started=t0,
                                           budget_seconds=budget_seconds, progress=progress, desc="distill", loss_name="mse")
    mse_end = mse_all()
    hooks.remove()
    kept = mse_end > mse_start  # never hand back a LoRA further from the teacher than the projection was
    refined = ported if kept else hooks.into(ported)
    t_train = time.perf_counter() - t1
    report = UnetRefineReport(
        steps=done, steps_requested=steps, samples=samples, noisings=noisings, latent_size=size, sampler_steps=sampler_steps,
        guidance=guidance, prompts=len(prompt_list) or (conditions.shape[0] if conditions is not None else 0), prompts_from=prompts_from,
        prediction_type=sched.prediction_type, batch=batches.batch, lr=lr, start_method=start_method,
        mse_start=round(mse_start, 6), mse_end=round(mse_end, 6), mse_history=thin(history), samples_cached=from_cache,
        sample_s=round(t_sample, 3), train_s=round(t_train, 3), wall_s=round(time.perf_counter() - t0, 3), device=str(dev),
        dtype=str(dtype).replace("torch.", ""), seed=seed, stopped_by_budget=stopped, kept_projection=kept,
    )
    return refined, report
