"""Data-free self-distillation of a ported LoRA onto a flow-matching transformer (HunyuanVideo, Wan, FLUX.1, Chroma).

teacher = source transformer + source LoRA (ΔW merged). It first makes its own clean latents: ``samples`` Euler
runs of ``sampler_steps`` steps down its flow schedule, at a small latent size and frame count, conditioned on
prompts (or given embeddings). Each latent is re-noised at ``noisings`` random σ (drawn as the student's sampler
visits them) and the teacher's velocity there is stored; then the teacher is freed, so the two transformers are
never resident together. The student (target transformer, frozen; the ported LoRA's factors trainable through
forward hooks) is trained on the MSE between its velocity and the target's:

- ``target="teacher"`` (the default): the teacher's velocity on the same noisy latent;
- ``target="sample"``: the sample's own velocity, noise − x0. For a student given a conditioning image the teacher
  never saw (T2V → I2V) it looked the better target, but on the benchmark's T2V → I2V pair the teacher's velocity
  recovered 1–3 points more of the retrained gain at every budget (bench/fidelity/RESULTS.md), so it is an option.

An image-to-video student gets its conditioning image from the teacher's own sample (its first latent frame),
arranged as its family data says (channels concatenated with a first-frame mask, or the first frame's tokens
replaced). Two-expert families (Wan 2.2 A14B): a teacher switches experts at the boundary while sampling; a
student's expert LoRAs are each trained on the noise range that expert serves.

How a transformer is called (latent layout, timestep scale, which keyword gets which input, embedded guidance) is
the family's ``diffusion.denoiser`` data; nothing here is specific to one model.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from ..core.errors import InputError
from ..core.lora import Lora
from ..registry.families import DenoiserSpec, Family
from .conditioning import TextConditioner, component_folder, metadata_prompts
from .flow import add_flow_noise, euler_sample, random_sigmas, read_flow, sampling_sigmas
from .hooks import TrainableLora, merge, modules_of
from .options import RefineJob, RefineOptions
from .report import RefineReportBase
from .runtime import load_diffusers_model, release
from .samples_cache import cached, lora_digest, model_digest, tensor_digest
from .train import Shuffled, mean_loss, thin, train_factors

SAMPLES_VERSION = 1
#: 3x the UNets' 1e-3: on the benchmark's DiT pairs 3e-3 recovered 2-3 points more at 100 steps (bench/fidelity/RESULTS.md)
DEFAULT_LR = 3e-3
DEFAULT_BATCH = 4
#: half the UNets' 64: on the benchmark's DiT pairs 32 latents gave the gain of 64 at 0.6x the time (bench/fidelity/RESULTS.md)
DEFAULT_SAMPLES = 32
DEFAULT_FRAMES = 3  # latent frames of a video sample: the first (the image) and two that follow it
DEFAULT_SIZE = {"video": 16, "packed_2x2": 32}  # latent side: 128 px for video, 256 px for images
#: the names a conditions dict or a --prompts-embeds file may hold
CONDITION_NAMES = ("text", "text_mask", "pooled", "image_embeds")
_CHUNK = 8


class ExpertReport(BaseModel):
    """One trained transformer (two for a two-expert target)."""

    component: str
    sigma_range: list[float]
    examples: int
    steps: int
    mse_start: float
    mse_end: float
    kept_projection: bool


class DitRefineReport(RefineReportBase):
    model: str = "diffusion transformer"
    loss: str = "mse"
    noisings: int
    latent_size: int
    frames: int
    sampler_steps: int
    guidance: float
    guidance_low_noise: Optional[float] = None  # a two-expert teacher's low-noise expert, where it differs
    embedded_guidance: Optional[float] = None  # the guidance value a guidance-distilled teacher is given (family data)
    shift: float
    schedule_from: str
    prompts: int
    prompts_from: str
    target: str
    image_condition: Optional[str] = None
    mse_start: float
    mse_end: float
    experts: list[ExpertReport] = []
    mse_history: list[list[float]] = []


@dataclass
class Conditions:
    """Per-prompt conditioning tensors named as denoiser inputs (text, text_mask, pooled, image_embeds), on the CPU."""

    tensors: dict[str, torch.Tensor]
    uncond: Optional[dict[str, torch.Tensor]] = None  # one row: the empty prompt, for classifier-free guidance

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def rows(self, idx: torch.Tensor, device, dtype, uncond: bool = False) -> dict[str, torch.Tensor]:
        src = self.uncond if uncond else self.tensors
        pick = torch.zeros(len(idx), dtype=torch.long) if uncond else idx
        return {k: (v[pick].to(device, dtype) if v.is_floating_point() else v[pick].to(device)) for k, v in src.items()}


def given_conditions(options: RefineOptions) -> Optional[dict[str, torch.Tensor]]:
    """The conditioning tensors given instead of prompts (``conditions`` or a ``prompts_embeds`` file), checked."""
    given = options.conditions
    if options.prompts_embeds is not None:
        path = Path(options.prompts_embeds)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:  # safetensors only: never a pickle
                given = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a broken file
            raise InputError(f"{path}: cannot read the embeddings ({e.__class__.__name__}); --prompts-embeds takes a safetensors "
                             f"file of {', '.join(CONDITION_NAMES)} tensors, one row per prompt") from None
    if given is None:
        return None
    if isinstance(given, torch.Tensor):
        given = {"text": given}
    unknown = sorted(set(given) - set(CONDITION_NAMES))
    if unknown or "text" not in given:
        raise InputError(f"conditioning tensors must be named {', '.join(CONDITION_NAMES)} (text required); got {', '.join(sorted(given))}")
    rows = {k: v.shape[0] for k, v in given.items()}
    if len(set(rows.values())) != 1:
        raise InputError(f"conditioning tensors disagree on the number of prompts: {rows}")
    return {k: v.float() if v.is_floating_point() else v for k, v in given.items()}


def _encoded(enc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    names = {"encoder_hidden_states": "text", "text_embeds": "pooled", "attention_mask": "text_mask"}
    return {names[k]: v for k, v in enc.items()}


def conditions_for(family: Family, folder: Path, lora: Optional[Lora], prompts: list[str], given: Optional[dict],
                   guidance: float, device: torch.device, dtype: torch.dtype) -> Conditions:
    """This side's conditioning: the given tensors, else its own text encoders run on the prompts (then freed)."""
    if given is not None:
        return Conditions(given)
    text = TextConditioner(family, folder, lora, device, dtype)
    if not text.enabled:
        raise InputError(f"{family.id} lists no text encoders: give the conditioning as tensors (--prompts-embeds)")
    enc = _encoded(text.encode(list(prompts) + ([""] if guidance != 1.0 else [])))
    if guidance == 1.0:
        return Conditions(enc)
    return Conditions({k: v[:-1] for k, v in enc.items()}, {k: v[-1:] for k, v in enc.items()})


def _student_conditions(family: Family, folder: Path, ported: Lora, prompts: list[str], given: Optional[dict], device: torch.device,
                        dtype: torch.dtype, cache_dir) -> Conditions:
    """The student's text conditioning; its encoders run once per model, prompts and text-encoder LoRA (cached)."""
    if given is not None:
        return Conditions(given)
    encoders = {c.component for c in family.spec.diffusion.conditioning}
    te = Lora(family=family.id, modules={k: m for k, m in ported.modules.items() if m.component in encoders})
    key = {"v": SAMPLES_VERSION, "model": model_digest(folder), "family": family.id, "dtype": str(dtype),
           "text_lora": lora_digest(te) if te.modules else None, "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
           "conditioning": [c.model_dump() for c in family.spec.diffusion.conditioning]}
    tensors, _ = cached(cache_dir, "distill-text", key, lambda: conditions_for(family, folder, ported, prompts, None, 1.0, device, dtype).tensors)
    return Conditions(tensors)


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, H W / 4, 4 C]: 2x2 patches as tokens, channels before the patch position."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, d = x.shape
    c = d // 4
    return x.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int) -> torch.Tensor:
    """Position ids of packed image tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3)


class Denoiser:
    """One transformer and the way its family calls it; takes and returns latents as [B, C, F, H, W]."""

    def __init__(self, model, spec: DenoiserSpec):
        self.model, self.spec = model, spec
        self.config = dict(model.config)
        ic = spec.image_condition
        self.image = ic if ic is not None and ic.required else None
        self.guidance = spec.embedded_guidance(self.config)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor], first: Optional[torch.Tensor]) -> torch.Tensor:
        b, c, frames, h, w = x.shape
        dev, dtype = x.device, x.dtype
        values = dict(cond)
        inp = x
        ic = self.image
        if ic is not None and ic.type == "token_replace":
            inp = torch.cat([first, x[:, :, 1:]], dim=2)
        elif ic is not None and ic.type == "concat":
            rest = torch.zeros(b, c, frames - 1, h, w, device=dev, dtype=dtype)
            image = first.expand(-1, -1, frames, -1, -1) if ic.image_frames == "all" else torch.cat([first, rest], dim=2)
            mask = torch.zeros(b, ic.mask_channels, frames, h, w, device=dev, dtype=dtype)
            mask[:, :, 0] = 1
            parts = {"latents": x, "image": image, "mask": mask}
            inp = torch.cat([parts[p] for p in ic.order], dim=1)
        packed = self.spec.latents == "packed_2x2"
        if packed:
            inp = pack(inp[:, :, 0])
            values["image_ids"] = image_ids(h, w).to(dev, dtype)
            values["text_ids"] = torch.zeros(values["text"].shape[1], 3, device=dev, dtype=dtype)
        mask = values.get("text_mask")
        if mask is None:
            mask = torch.ones(b, values["text"].shape[1], device=dev)
            values["text_mask"] = mask.to(dtype)
        tokens = (h // 2) * (w // 2)
        values["joint_mask"] = torch.cat([mask.bool(), torch.ones(b, tokens, dtype=torch.bool, device=dev)], dim=1)
        values["latents"] = inp
        # float32 as the pipelines pass it: in bf16, σ x 1000 would be rounded to steps of 4
        values["timestep"] = (sigma.float() * self.spec.timestep_scale).to(dev)
        if self.guidance is not None:
            values["guidance"] = torch.full((b,), self.guidance.value * self.guidance.multiplier, device=dev, dtype=dtype)
        kwargs = {kw: values[name] for kw, name in self.spec.inputs.items() if name in values}
        out = self.model(**kwargs, return_dict=False)[0]
        return unpack(out, h, w)[:, :, None] if packed else out


def _embedded_guidance(family: Family) -> Optional[float]:
    den = family.spec.diffusion.denoiser
    guidance = den.embedded_guidance(family.components[den.component].spec.architecture.config)
    return guidance.value if guidance is not None else None


def _components(family: Family, folder: Path) -> list[tuple[str, float, float]]:
    """(transformer component, σ from, σ to) for each denoiser of the family, highest noise first; the boundary
    between experts is the model folder's (``model_index.json``, as diffusers' pipelines read it) over the family's."""
    e = family.spec.experts
    if e is None:
        return [(family.spec.diffusion.denoiser.component, 0.0, 1.0)]
    b = e.boundary_ratio if e.boundary_ratio is not None else 0.875
    index = folder / "model_index.json"
    if index.is_file():
        try:
            given = json.loads(index.read_text(encoding="utf-8")).get("boundary_ratio")
        except (OSError, ValueError, AttributeError):
            raise InputError(f"{index}: not a valid model index (JSON object)") from None
        if given is not None:
            if not isinstance(given, (int, float)) or not 0 < given < 1:
                raise InputError(f"{index}: boundary_ratio {given!r} is not a number between 0 and 1")
            b = float(given)
    return [(e.high_noise, b, 1.0), (e.low_noise, 0.0, b)]


def _load(family: Family, folder: Path, component: str, dtype: torch.dtype):
    arch = family.components[component].spec.architecture
    return load_diffusers_model(arch.class_, component_folder(family, folder, component), dtype, f"{family.id} {component}")


def _in_range(sigma: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return (sigma >= low) & ((sigma < high) | (high >= 1.0))


@dataclass
class _Teacher:
    family: Family
    folder: Path
    lora: Lora
    cond: Conditions
    guidance: float
    device: torch.device
    dtype: torch.dtype
    scales: Optional[dict[str, float]] = None  # classifier-free guidance per expert component where it differs

    def scale(self, component: str) -> float:
        return (self.scales or {}).get(component, self.guidance)

    def open(self, component: str) -> Denoiser:
        model = _load(self.family, self.folder, component, self.dtype)
        merge(model, modules_of(self.lora, component))
        return Denoiser(model.to(self.device), self.family.spec.diffusion.denoiser)

    def velocity(self, den: Denoiser, x: torch.Tensor, sigma: torch.Tensor, idx: torch.Tensor, guided: bool,
                 scale: Optional[float] = None) -> torch.Tensor:
        dev, dt = self.device, self.dtype
        with torch.no_grad():
            v = den(x.to(dev, dt), sigma.to(dev), self.cond.rows(idx, dev, dt), None).float()
            if guided and self.cond.uncond is not None:
                u = den(x.to(dev, dt), sigma.to(dev), self.cond.rows(idx, dev, dt, uncond=True), None).float()
                v = u + (self.guidance if scale is None else scale) * (v - u)
        return v.cpu()


def _teacher_data(t: _Teacher, *, samples: int, noisings: int, shape: tuple[int, ...], sampler_steps: int, teacher_shift: float,
                  ranges: list[tuple[float, float]], student_shift: float, seed: int, progress: bool) -> dict[str, torch.Tensor]:
    """The teacher's samples x0, and per re-noising: its sample, noise, σ, prompt and the teacher's velocity."""
    g = torch.Generator().manual_seed(seed)
    which = torch.arange(samples) % len(t.cond)
    x = torch.randn(samples, *shape, generator=g)
    sigmas = sampling_sigmas(sampler_steps, teacher_shift)
    parts = _components(t.family, t.folder)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=samples * len(parts), desc="teacher samples", unit="latent", leave=False)
    open_den = None  # (component, denoiser): the last expert used stays loaded for the velocities below
    for component, low, high in parts:  # a two-expert teacher: each expert runs the steps that start in its range
        steps = [i for i in range(sampler_steps) if _in_range(torch.tensor([float(sigmas[i])]), low, high).item()]
        if not steps:
            continue
        open_den = den = None  # the previous expert is dropped before the next one loads
        release()
        open_den = (component, t.open(component))
        den = open_den[1]
        for s in range(0, samples, _CHUNK):
            idx = which[s : s + _CHUNK]
            sub = sigmas[steps[0] : steps[-1] + 2]
            x[s : s + _CHUNK] = euler_sample(lambda xx, ss, idx=idx, den=den, w=t.scale(component): t.velocity(den, xx, ss, idx, True, w),
                                             x[s : s + _CHUNK], sub)
            if bar:
                bar.update(len(idx))
    if bar:
        bar.close()
    x0 = x
    # re-noisings: `noisings` per sample in each of the student's noise ranges, σ drawn as its sampler visits them
    src, sig = [], []
    for low, high in ranges:
        src.append(torch.arange(samples).repeat_interleave(noisings))
        sig.append(random_sigmas(samples * noisings, student_shift, low, high, g))
    src, sig = torch.cat(src), torch.cat(sig)
    noise = torch.randn(len(src), *shape, generator=g)
    target = torch.empty(len(src), *shape)
    # the expert still loaded goes first, so a one-transformer teacher is loaded once
    for component, low, high in sorted(parts, key=lambda p: open_den is None or p[0] != open_den[0]):
        sel = torch.nonzero(_in_range(sig, low, high)).flatten()
        if len(sel) == 0:
            continue
        if open_den is None or open_den[0] != component:
            open_den = den = None
            release()
            open_den = (component, t.open(component))
        den = open_den[1]
        for s in range(0, len(sel), _CHUNK):
            rows = sel[s : s + _CHUNK]
            xt = add_flow_noise(x0[src[rows]], noise[rows], sig[rows])
            target[rows] = t.velocity(den, xt, sig[rows], which[src[rows]], guided=False)
    open_den = den = None
    release()
    return {"x0": x0, "src": src, "sigma": sig, "noise": noise, "prompt": which[src], "teacher": target}


class _Student:
    """One target transformer with the ported LoRA's factors trainable, and its loss on the stored examples ``sel``."""

    def __init__(self, family: Family, folder: Path, component: str, modules, spec: DenoiserSpec, data: dict, goal: torch.Tensor,
                 cond: Conditions, sel: torch.Tensor, image, frame0: bool, device: torch.device, dtype: torch.dtype, batch: int):
        model = _load(family, folder, component, dtype).to(device)
        self.hooks = TrainableLora(model, modules, device)
        if device.type == "cuda" and hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()
        self.den = Denoiser(model, spec)
        self.data, self.goal, self.cond, self.sel, self.image, self.frame0 = data, goal, cond, sel, image, frame0
        self.device, self.dtype, self.batch = device, dtype, batch

    def mse(self, rows: torch.Tensor) -> torch.Tensor:
        d, dev, dt = self.data, self.device, self.dtype
        rows = self.sel[rows]
        x0 = d["x0"][d["src"][rows]]
        xt = add_flow_noise(x0, d["noise"][rows], d["sigma"][rows])
        first = x0[:, :, :1].to(dev, dt) if self.image is not None else None
        pred = self.den(xt.to(dev, dt), d["sigma"][rows].to(dev), self.cond.rows(d["prompt"][rows], dev, dt), first).float()
        want = self.goal[rows].to(dev)
        if self.frame0:  # token replacement: the first frame is the given image, so its velocity is no target
            pred, want = pred[:, :, 1:], want[:, :, 1:]
        return F.mse_loss(pred, want)

    def mse_all(self) -> float:
        return mean_loss(len(self.sel), self.batch, self.mse)


def _check_shape(spec: DenoiserSpec, size: int, frames: int) -> None:
    if size % 2:
        raise InputError(f"--latent-size {size}: transformer latents need an even side (2x2 patches)")
    if spec.latents != "video" and frames != 1:
        raise InputError("--frames: this family's denoiser makes images (one frame)")
    if spec.image_condition is not None and spec.image_condition.required and frames < 2 and spec.latents == "video":
        raise InputError("--frames: an image-to-video student needs at least 2 latent frames (the image and one to make)")


def refine_dit(ported: Lora, job: RefineJob, options: RefineOptions) -> tuple[Lora, DitRefineReport]:
    """Refine ``ported`` (a LoRA on the job's target transformer) by distilling the source transformer + source LoRA."""
    o = options
    src_fam, tgt_fam = job.source_family, job.target_family
    src_spec, tgt_spec = src_fam.spec.diffusion, tgt_fam.spec.diffusion
    steps, noisings, sampler_steps, seed = o.steps, o.noisings, o.sampler_steps, o.seed
    samples = DEFAULT_SAMPLES if o.samples is None else o.samples
    batch = DEFAULT_BATCH if o.batch is None else o.batch
    if steps < 0 or samples < 1 or noisings < 1 or sampler_steps < 1 or batch < 1:
        raise InputError("distill needs steps >= 0, samples >= 1, noisings >= 1, sampler steps >= 1, batch >= 1")
    dev = torch.device(job.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    lr = DEFAULT_LR if o.lr is None else float(o.lr)
    guidance = src_spec.denoiser.classifier_free_guidance if o.guidance is None else float(o.guidance)
    src_folder, tgt_folder = Path(job.source_model), Path(job.target_model)
    sden, tden = src_spec.denoiser, tgt_spec.denoiser
    size = o.latent_size or DEFAULT_SIZE[sden.latents]
    frames = o.frames or (DEFAULT_FRAMES if sden.latents == "video" else 1)
    _check_shape(sden, size, frames)
    _check_shape(tden, size, frames)
    image = tden.image_condition if tden.image_condition is not None and tden.image_condition.required else None
    target = o.target or "teacher"
    given = given_conditions(o)
    if image is not None and image.image_embeds and (given is None or "image_embeds" not in given):
        raise InputError(f"{tgt_fam.id} also takes image-encoder embeddings of its conditioning image, which a data-free "
                         "refinement cannot make: give them as image_embeds in --prompts-embeds")
    takes_pooled = [f.id for f in (src_fam, tgt_fam) if "pooled" in f.spec.diffusion.denoiser.inputs.values()]
    if given is not None and takes_pooled and "pooled" not in given:
        raise InputError(f"{takes_pooled[0]}'s transformer takes a pooled text vector: give it as pooled in --prompts-embeds "
                         "(zeros in its place would be a conditioning it never saw)")
    flow_s, flow_t = read_flow(src_folder, src_spec), read_flow(tgt_folder, tgt_spec)
    tokens = (size // 2) ** 2
    shift_s, shift_t = flow_s.shift_for(tokens), flow_t.shift_for(tokens)
    if o.prompts:
        prompts, prompts_from = list(o.prompts), "--prompts"
    elif given is not None:
        prompts, prompts_from = [], f"{len(next(iter(given.values())))} given embeddings"
    else:
        prompts, prompts_from = metadata_prompts(job.source_lora.metadata, samples, seed)
        if not prompts:
            prompts, prompts_from = [""], "the empty prompt (no --prompts, no trigger words or tags in the LoRA's metadata)"
    if given is not None:
        guidance = 1.0  # no unconditional embedding comes with given tensors
    # a two-expert teacher's low-noise expert may guide with its own scale (an explicit --guidance sets both)
    experts_s = src_fam.spec.experts
    low_guidance = (experts_s.low_noise_guidance if experts_s is not None and experts_s.low_noise_guidance is not None
                    and o.guidance is None and given is None else None)
    scales = {experts_s.low_noise: low_guidance} if low_guidance is not None else None
    shape = (sden.latent_channels, frames, size, size)
    ranges = [(low, high) for _, low, high in _components(tgt_fam, tgt_folder)]
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    # the source family's data says how the teacher is called (guidance, timestep scale, inputs, encoders, experts)
    teacher_data = {"family": src_fam.id, "diffusion": src_spec.model_dump(mode="json", exclude={"notes"}),
                    "experts": src_fam.spec.experts.model_dump(mode="json", exclude={"notes"}) if src_fam.spec.experts else None}
    key = {"v": SAMPLES_VERSION, "model": model_digest(src_folder), "lora": lora_digest(job.source_lora), "samples": samples,
           "teacher": teacher_data,
           "noisings": noisings, "shape": list(shape), "sampler_steps": sampler_steps, "guidance": guidance, "scales": scales, "seed": seed,
           "shift": shift_s, "student_shift": shift_t, "ranges": ranges, "dtype": str(dtype),
           "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
           "given": {k: tensor_digest(v) for k, v in sorted(given.items())} if given else None}

    def make() -> dict[str, torch.Tensor]:
        uncond_for = guidance if guidance != 1.0 or low_guidance is None else low_guidance  # 1.0: no unconditional pass
        cond = conditions_for(src_fam, src_folder, job.source_lora, prompts, given, uncond_for, dev, dtype)
        teacher = _Teacher(src_fam, src_folder, job.source_lora, cond, guidance, dev, dtype, scales)
        return _teacher_data(teacher, samples=samples, noisings=noisings, shape=shape, sampler_steps=sampler_steps,
                             teacher_shift=shift_s, ranges=ranges, student_shift=shift_t, seed=seed, progress=job.progress)

    data, from_cache = cached(job.cache_dir, "distill-flow", key, make)
    t_sample = time.perf_counter() - t0

    t1 = time.perf_counter()
    cond = _student_conditions(tgt_fam, tgt_folder, ported, prompts, given, dev, dtype, job.cache_dir)
    goal = data["teacher"] if target == "teacher" else data["noise"] - data["x0"][data["src"]]
    frame0 = image is not None and image.type == "token_replace"
    refined, experts, history, offset, stopped = ported, [], [], 0, False
    remaining = None if o.budget_seconds is None else o.budget_seconds
    # the experts with modules to train and examples in their range (one where the family has no experts)
    trainable = [(c, low, high) for c, low, high in _components(tgt_fam, tgt_folder)
                 if modules_of(ported, c) and bool(_in_range(data["sigma"], low, high).any())]
    for component, low, high in trainable:
        sel = torch.nonzero(_in_range(data["sigma"], low, high)).flatten()
        student = _Student(tgt_fam, tgt_folder, component, modules_of(ported, component), tden, data, goal, cond, sel, image,
                           frame0, dev, dtype, batch)
        start = student.mse_all()
        order = Shuffled(len(sel), batch, seed + 1)
        done, hist, stopped = train_factors(student.hooks.parameters(), lambda step: student.mse(order()), steps=steps, lr=lr,
                                            started=t0, budget_seconds=remaining, progress=job.progress, desc=f"distill {component}",
                                            loss_name="mse")
        end = student.mse_all()
        student.hooks.remove()
        kept = end > start  # never hand back a LoRA further from the teacher than the projection was
        if not kept:
            refined = student.hooks.into(refined)
        experts.append(ExpertReport(component=component, sigma_range=[round(low, 4), round(high, 4)], examples=len(sel), steps=done,
                                    mse_start=round(start, 6), mse_end=round(end, 6), kept_projection=kept))
        history += [[offset + s, v] for s, v in thin(hist)]
        offset += steps
        student = None  # this expert's transformer is dropped before the next one loads
        release()
        if stopped:
            break
    if not experts:
        raise InputError("the ported LoRA has no module on the target's transformer; there is nothing for distillation to refine")
    n = sum(e.examples for e in experts)
    report = DitRefineReport(
        steps=sum(e.steps for e in experts), steps_requested=steps * len(trainable), samples=samples, noisings=noisings,
        latent_size=size, frames=frames, sampler_steps=sampler_steps, guidance=guidance, guidance_low_noise=low_guidance,
        embedded_guidance=_embedded_guidance(src_fam),
        shift=round(shift_s, 4),
        schedule_from=flow_s.source if flow_s.source == "family" else "scheduler config",
        prompts=len(prompts) or len(next(iter(given.values()))), prompts_from=prompts_from, target=target,
        image_condition=image.type if image is not None else None,
        mse_start=round(sum(e.mse_start * e.examples for e in experts) / n, 6),
        mse_end=round(sum((e.mse_start if e.kept_projection else e.mse_end) * e.examples for e in experts) / n, 6),
        experts=experts, mse_history=history,
        batch=min(batch, n), lr=lr, start_method=job.start_method, samples_cached=from_cache, sample_s=round(t_sample, 3),
        train_s=round(time.perf_counter() - t1, 3), wall_s=round(time.perf_counter() - t0, 3), device=str(dev),
        dtype=str(dtype).replace("torch.", ""), seed=seed, stopped_by_budget=stopped,
        kept_projection=all(e.kept_projection for e in experts),
    )
    return refined, report
