"""Language-model pair: a byte-level Llama (GQA) trained on the Python standard library's sources.

v1: trained on the stdlib's code; v2: v1 trained further on a shifted mix (half of it packages v1
never saw); v3: the same recipe as v1 from another seed (negative control); v4: v1 trained 3x longer
than v2, at v1's learning rate, on a mix weighted further towards the new packages (the far pair).
The task LoRA learns English prose: the Python language reference shipped as ``pydoc_data.topics``,
split by topic.
"""

from __future__ import annotations

import json
import random
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import lorareg
from lorareg.evaluate import LossEvaluator, windows

from common import LoraHooks, deltas_of, fit, gain, layer_similarities, port, weight_change

FAMILY = "fid-llama"
CONFIG = json.loads((Path(__file__).parent / "data/schemas/families/fid-llama.json").read_text())["components"]["model"]["architecture"]["config"]
LORA_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHIFT_PACKAGES = ("email", "xml", "asyncio", "http", "urllib", "idlelib", "tkinter")
SKIP_DIRS = {"test", "tests", "idle_test", "pydoc_data", "encodings", "site-packages", "dist-packages", "__pycache__", "turtledemo", "lib2to3"}


@dataclass
class Budget:
    v1_steps: int = 1200
    v2_steps: int = 400
    v4_steps: int = 1200
    lora_steps: int = 250
    batch: int = 16
    seq: int = 128
    eval_windows: int = 256
    lr: float = 2e-3
    lora_lr: float = 3e-3
    rank: int = 8
    alpha: float = 16.0


TINY = Budget(v1_steps=30, v2_steps=10, v4_steps=30, lora_steps=10, batch=8, seq=64, eval_windows=16)


def corpora() -> dict[str, bytes]:
    std = Path(sysconfig.get_paths()["stdlib"])
    base, shift = [], []
    for p in sorted(std.rglob("*.py")):
        rel = p.relative_to(std).parts
        if SKIP_DIRS & set(rel[:-1]) or p.name.startswith("test_"):
            continue
        (shift if rel[0] in SHIFT_PACKAGES else base).append(p.read_bytes())
    import pydoc_data.topics as topics

    keys = sorted(topics.topics)
    random.Random(0).shuffle(keys)
    cut = int(0.85 * len(keys))
    prose = lambda ks: "\n\n".join(topics.topics[k] for k in sorted(ks)).encode("utf-8")  # noqa: E731
    return {"base": b"\n\n".join(base), "shift": b"\n\n".join(shift), "task_train": prose(keys[:cut]), "task_heldout": prose(keys[cut:])}


def as_ids(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class Sampler:
    """Random windows from a weighted mix of byte corpora, reproducible from a seed."""

    def __init__(self, mix: list[tuple[torch.Tensor, float]], seq: int, batch: int, seed: int):
        self.mix, self.seq, self.batch = mix, seq, batch
        self.g = torch.Generator().manual_seed(seed)
        w = torch.tensor([m[1] for m in mix], dtype=torch.float)
        self.p = w / w.sum()

    def __call__(self) -> torch.Tensor:
        which = torch.multinomial(self.p, self.batch, replacement=True, generator=self.g)
        rows = []
        for i in which.tolist():
            ids = self.mix[i][0]
            start = int(torch.randint(0, ids.numel() - self.seq, (1,), generator=self.g))
            rows.append(ids[start : start + self.seq])
        return torch.stack(rows)


def new_model(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CONFIG))


def train(model, params, sampler: Sampler, steps: int, lr: float, warmup: int = 20) -> float:
    def loss_at() -> torch.Tensor:
        x = sampler()
        return model(input_ids=x, labels=x).loss

    return fit(model, params, loss_at, steps, lr, warmup, betas=(0.9, 0.98))


def train_lora(model, sampler: Sampler, b: Budget, seed: int) -> LoraHooks:
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in model.named_modules() if n.endswith(LORA_TARGETS)]
    hooks = LoraHooks(model, names, b.rank, b.alpha, seed)
    train(model, hooks.parameters(), sampler, b.lora_steps, b.lora_lr, warmup=10)
    hooks.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    return hooks


def build(root: Path, b: Budget, log, reuse: bool = False) -> dict:
    """Train v1..v4 and the task LoRAs; save them under root. Returns timing and data info.

    With ``reuse``, models and LoRAs already saved under root are loaded instead of trained, so a work
    folder from an earlier run only gets what it lacks (e.g. v4, added after v1..v3 were trained).
    """
    from lorareg.evaluate import load_causal_lm

    t0 = time.perf_counter()
    data = corpora()
    base, shift = as_ids(data["base"]), as_ids(data["shift"])
    task = as_ids(data["task_train"])
    info = {"corpus_bytes": {k: len(v) for k, v in data.items()}, "reused": []}
    timings = {}

    def get(name: str, make):
        """root/name: loaded (reuse) or trained by make() -> (model, last train loss), saved and timed."""
        if reuse and (root / name / "config.json").exists():
            info["reused"].append(name)
            return load_causal_lm(root / name)
        t = time.perf_counter()
        model, info[f"{name}_final_train_loss"] = make()
        model.save_pretrained(root / name)
        timings[f"train_{name}_s"] = time.perf_counter() - t
        log(f"lm: {name} trained ({timings[f'train_{name}_s']:.0f} s, last loss {info[f'{name}_final_train_loss']:.3f})")
        return model

    def scratch(seed: int, sampler_seed: int):
        model = new_model(seed=seed)
        return model, train(model, list(model.parameters()), Sampler([(base, 1.0)], b.seq, b.batch, seed=sampler_seed), b.v1_steps, b.lr)

    def continued(mix, steps: int, lr: float, sampler_seed: int):
        model = new_model(seed=1)
        model.load_state_dict(v1.state_dict())
        return model, train(model, list(model.parameters()), Sampler(mix, b.seq, b.batch, seed=sampler_seed), steps, lr)

    v1 = get("v1", lambda: scratch(1, 11))
    # v2: a short annealed continuation, half of it on packages v1 never saw (the checkpoint upgrade)
    v2 = get("v2", lambda: continued([(base, 0.5), (shift, 0.5)], b.v2_steps, b.lr * 0.5, 12))
    v3 = get("v3", lambda: scratch(3, 13))
    # v4, the far pair: a new pre-training phase on the shifted mix (3x v2's steps, at v1's learning rate,
    # three quarters of it on the new packages), like a code-specialised continuation of a general model
    v4 = get("v4", lambda: continued([(base, 0.25), (shift, 0.75)], b.v4_steps, b.lr, 14))

    # task LoRAs: on v1 (the one to port), and retrained on each target with the same budget and data order
    t = time.perf_counter()
    for name, model in (("v1", v1), ("v2", v2), ("v3", v3), ("v4", v4)):
        if reuse and (root / f"lora-{name}").exists():
            info["reused"].append(f"lora-{name}")
            continue
        hooks = train_lora(model, Sampler([(task, 1.0)], b.seq, b.batch, seed=21), b, seed=22)
        lorareg.save(hooks.to_lora(FAMILY, "model"), root / f"lora-{name}", format="peft", force=True)
    timings["train_loras_s"] = time.perf_counter() - t
    for name, model in (("v2", v2), ("v3", v3), ("v4", v4)):
        info[f"weight_change_v1_{name}"] = weight_change(v1.state_dict(), model.state_dict())
    (root / "heldout.txt").write_bytes(data["task_heldout"])
    info["timings"] = timings
    info["build_s"] = time.perf_counter() - t0
    log(f"lm: LoRAs ready ({timings['train_loras_s']:.0f} s" + (f"; reused {', '.join(info['reused'])}" if info["reused"] else "")
        + f"); ‖W−W1‖/‖W1‖: v2 {info['weight_change_v1_v2']:.3f}, v3 {info['weight_change_v1_v3']:.3f}, v4 {info['weight_change_v1_v4']:.3f}")
    return info


def evaluate(root: Path, b: Budget, methods: list[str], thresholds: list[float], log) -> dict:
    """Port lora-v1 onto v2 and v3 with every method and measure the held-out task loss."""
    from lorareg.evaluate import load_causal_lm

    held = windows(as_ids((root / "heldout.txt").read_bytes()), b.seq, b.eval_windows)
    src_lora = lorareg.load(root / "lora-v1", family=FAMILY)
    v1 = load_causal_lm(root / "v1")
    ev1 = LossEvaluator(v1, held)
    out = {"source": {"loss_none": ev1.loss(), "loss_lora": ev1.loss(deltas_of(src_lora))}, "pairs": {}}
    for target, kind in (("v2", "checkpoint upgrade"), ("v3", "negative control (another seed)")):
        model = load_causal_lm(root / target)
        ev = LossEvaluator(model, held)
        none = ev.loss()
        ref = ev.loss(deltas_of(lorareg.load(root / f"lora-{target}", family=FAMILY)))
        rows = {}
        sweeps = {}
        for method in methods:
            ported, report, secs = port(src_lora, root / "v1", root / target, method, root / "ported" / f"{target}-{method}")
            loss = ev.loss(deltas_of(ported))
            sims = layer_similarities(report)
            rows[method] = {"loss": loss, "gain": gain(none, loss, ref), "ported": report.totals.ported, "skipped": report.totals.skipped,
                            "mean_similarity": report.totals.mean_similarity, "min_similarity": report.totals.min_similarity,
                            "energy_kept": report.totals.energy_kept, "port_s": secs}
            if method in ("copy", "prolora-full"):
                sweep = []
                for th in thresholds:
                    keep = {k for k, s in sims.items() if s >= th}
                    keep_t = {l.target for l in report.layers if l.source in keep and l.target}
                    loss_th = ev.loss(deltas_of(ported, keep_t))
                    sweep.append({"threshold": th, "layers": len(keep_t), "loss": loss_th, "gain": gain(none, loss_th, ref)})
                sweeps[method] = sweep
            if method == "copy":
                per_layer = sims
        out["pairs"][f"v1->{target}"] = {"kind": kind, "loss_none": none, "loss_retrained": ref, "methods": rows,
                                          "threshold_sweep": sweeps, "layer_similarity": per_layer}
        log(f"lm: v1->{target}: none {none:.4f}, retrained {ref:.4f}, " + ", ".join(f"{m} {100 * r['gain']:.0f}%" for m, r in rows.items()))
    return out


def general_text() -> bytes:
    """Code no model saw in training: the standard library's own test suite (its test/ folder is skipped by corpora())."""
    std = Path(sysconfig.get_paths()["stdlib"]) / "test"
    files = sorted(p for p in std.glob("test_*.py"))
    return b"\n\n".join(p.read_bytes() for p in files[:80])


#: the targets `--refine distill` is measured on, and what each pair stands for
DISTILL_KINDS = {"v2": "checkpoint upgrade", "v4": "far pair (3x longer on the shifted mix)", "v3": "negative control (another seed)"}


def evaluate_distill(root: Path, b: Budget, steps_list: list[int], log, lrs: tuple[float, ...] = (1e-3, 3e-3), target: str = "v2",
                     force_unrelated: bool = False) -> dict:
    """lorareg port --refine distill of lora-v1 onto ``target`` at several step budgets.

    Per budget: gain recovered on the task, wall time as a ratio to retraining the LoRA on the target
    (timed here, same budget as build()), the target's general-text loss with the refined LoRA, the
    fraction of the teacher's own score (v1 + LoRA, read with the target's gain formula) reached, and
    the final distillation KL. Extra rows at 50 steps with other learning rates.

    Also whether lorareg flags the pair as unrelated and refuses to refine it; a refused pair gets
    rows only with ``force_unrelated`` (the negative control: what distillation does there anyway).
    """
    from lorareg.evaluate import load_causal_lm

    held = windows(as_ids((root / "heldout.txt").read_bytes()), b.seq, b.eval_windows)
    gen = windows(as_ids(general_text()), b.seq, b.eval_windows)
    src_lora = lorareg.load(root / "lora-v1", family=FAMILY)
    v1 = load_causal_lm(root / "v1")
    teacher_loss = LossEvaluator(v1, held).loss(deltas_of(src_lora))
    del v1
    model = load_causal_lm(root / target)
    ev, ev_gen = LossEvaluator(model, held), LossEvaluator(model, gen)
    none = ev.loss()
    ref = ev.loss(deltas_of(lorareg.load(root / f"lora-{target}", family=FAMILY)))
    # time retraining the LoRA on the target (same data, budget and seeds as build())
    task = as_ids(corpora()["task_train"])
    retrain_model = load_causal_lm(root / target)
    t = time.perf_counter()
    train_lora(retrain_model, Sampler([(task, 1.0)], b.seq, b.batch, seed=21), b, seed=22)
    retrain_s = time.perf_counter() - t
    del retrain_model
    teacher_gain = gain(none, teacher_loss, ref)
    out = {"target": target, "kind": DISTILL_KINDS.get(target, ""), "sample_length": b.seq, "samples": 64, "loss_none": none, "loss_retrained": ref,
           "retrain_s": retrain_s, "loss_teacher": teacher_loss, "teacher_gain": teacher_gain, "general_loss_none": ev_gen.loss(), "rows": []}
    copy_ported, copy_report, _ = port(src_lora, root / "v1", root / target, "copy", root / "ported" / f"{target}-copy-d")
    copy_loss = ev.loss(deltas_of(copy_ported))
    out["copy"] = {"loss": copy_loss, "gain": gain(none, copy_loss, ref), "general_loss": ev_gen.loss(deltas_of(copy_ported))}
    out["related"], out["related_similarity"] = copy_report.totals.related, copy_report.totals.related_similarity
    # a fresh sample cache per target, so the first row generates the samples and every row's time counts them
    cache = root / "distill-cache" / target
    shutil.rmtree(cache, ignore_errors=True)
    common = dict(source_model=str(root / "v1"), target_model=str(root / target), force=True, progress=False, device="cpu",
                  refine="distill", refine_seed=0)
    # does lorareg refuse to refine this pair? Asked without force_unrelated, with a throw-away 1-sample set
    # (the refusal comes before any sampling; a related pair costs a fraction of a second here)
    try:
        lorareg.port(src_lora, **common, refine_steps=0, refine_samples=1, refine_sample_length=2, cache_dir=root / "distill-cache" / "probe")
        out["refused"] = None
    except lorareg.InputError as e:
        out["refused"] = str(e).splitlines()[0]
        log(f"lm: distill v1->{target} refused: {out['refused']}")
    out["forced"] = bool(out["refused"]) and force_unrelated
    if out["refused"] and not out["forced"]:
        return out
    runs = [(s, None) for s in steps_list] + [(50 if 50 in steps_list or not steps_list else steps_list[0], lr) for lr in lrs]
    sample_s = 0.0  # generating the samples (once; later runs read them from the cache): counted in every row's time
    for steps, lr in runs:
        dest = root / "ported" / f"{target}-distill-{steps}-{lr or 'default'}"
        t = time.perf_counter()
        res = lorareg.port(src_lora, **common, output=dest, refine_steps=steps, refine_samples=64, refine_sample_length=b.seq,
                           refine_lr=lr, cache_dir=cache, force_unrelated=out["forced"])
        wall = time.perf_counter() - t
        refined = lorareg.load(dest, family=FAMILY)
        loss = ev.loss(deltas_of(refined))
        r = res.report.refine
        g = gain(none, loss, ref)
        if not r["samples_cached"]:
            sample_s = r["sample_s"]
        total_s = r["wall_s"] + (sample_s if r["samples_cached"] else 0.0)
        row = {"steps": steps, "lr": r["lr"], "loss": loss, "gain": g, "teacher_fraction": g / teacher_gain if teacher_gain else float("nan"),
               "general_loss": ev_gen.loss(deltas_of(refined)), "kl_start": r["kl_start"], "kl_end": r["kl_end"],
               "refine_s": r["wall_s"], "sample_s": r["sample_s"], "samples_cached": r["samples_cached"], "port_s": wall,
               "refine_with_sampling_s": total_s, "time_ratio": total_s / retrain_s}
        out["rows"].append(row)
        log(f"lm: distill v1->{target} {steps} steps lr {r['lr']:g}: gain {100 * g:.1f}% (copy {100 * out['copy']['gain']:.1f}%), "
            f"KL {r['kl_start']:.4f} -> {r['kl_end']:.4f}, {total_s:.1f} s = {total_s / retrain_s:.2f}x retraining")
    return out
