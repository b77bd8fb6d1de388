#!/usr/bin/env python
"""Fidelity benchmark: do ported LoRAs work? Reproduces everything from scratch with fixed seeds.

    python bench/fidelity/run.py            # full run (~15-20 min on 2 CPU cores), writes bench/fidelity/RESULTS.md + PNGs
    python bench/fidelity/run.py --tiny     # a few steps of everything (< 1 min): the pipeline, not the numbers
    python bench/fidelity/run.py --only lm --work W --reuse-work --skip-methods --refine-steps 25,50,100,200
                                            # only the `--refine distill` rows: results_distill.json + RESULTS.md's LM distill section
    python bench/fidelity/run.py --only dit --threads 1
                                            # the flow-matching DiT pairs (dit.py), never part of the default run: results_dit.json
                                            # + RESULTS.md's DiT section

Trains small models on real data that ships offline (the Python standard library's sources and its
language reference; scikit-learn's digits), a task LoRA on each v1, ports it with every lorareg
method and compares the held-out task loss with no adapter and with a LoRA retrained on the target:

    gain recovered = (loss_none - loss_port) / (loss_none - loss_retrained)

See bench/fidelity/README.md for the set-up and bench/fidelity/RESULTS.md for the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

def _log(msg: str) -> None:
    print(msg, flush=True)


def _methods() -> list[str]:
    """lorareg port's default ("auto" where it exists) and every engine method."""
    from lorareg import PortOptions
    from lorareg.engine import METHODS as ENGINE

    default = PortOptions.model_fields["method"].default
    return list(dict.fromkeys([default, "copy", *ENGINE]))
THRESHOLDS = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
#: the similarity below which a pair is reported as "flagged" (not related enough to port)
FLAG_THRESHOLD = 0.5
#: the distill rows' step budget on the negative control (the budget that met the target on v2): it only has
#: to show what refining an unrelated pair does, once lorareg has been forced past its refusal
UNRELATED_STEPS = 100
#: RESULTS.md's LM distill section starts with this heading and runs to the next "## " heading or the end of the
#: file (--skip-methods rewrites only that section)
DISTILL_HEADING = "## Refinement: data-free self-distillation (LM)"
UNET_DISTILL_HEADING = "## Refinement: data-free self-distillation (UNet)"
#: rows at lorareg's default learning rate of UNet distillation are the main rows; others are the extra learning-rate rows
UNET_DEFAULT_LR = 1e-3  # = lorareg.refine.distill_unet.DEFAULT_LR (checked when the section is written)


def _setup_env(work: Path) -> None:
    roots = [str(HERE / "data")] + [p for p in os.environ.get("LORAREG_DATA_PATH", "").split(os.pathsep) if p]
    os.environ["LORAREG_DATA_PATH"] = os.pathsep.join(roots)
    os.environ["LORAREG_CACHE"] = str(work / "bases-cache")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(out: Path, *, tiny: bool = False, work: Path | None = None, threads: int | None = None, parts=("lm", "diffusion"),
        refine_steps: tuple[int, ...] = (), refine_targets: tuple[str, ...] = ("v2", "v4", "v3"),
        reuse: bool = False, skip_methods: bool = False, command: str = "python bench/fidelity/run.py", log=_log) -> dict:
    """Build everything, evaluate, write results.json, RESULTS.md and plots into ``out``; returns the results.

    ``skip_methods``: only the LM's distill rows (no training-free tables, no diffusion); they go to
    results_distill.json and replace RESULTS.md's distill section, leaving the rest of both as they are.
    """
    own_work = work is None
    work = Path(tempfile.mkdtemp(prefix="lorareg-fidelity-")) if own_work else Path(work)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _setup_env(work)
    import torch
    import warnings

    warnings.filterwarnings("ignore")
    if threads:
        torch.set_num_threads(threads)
    import lorareg

    METHODS = _methods()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    results = {"tiny": tiny, "command": command, "threads": torch.get_num_threads(), "environment": {
        "python": platform.python_version(), "torch": torch.__version__, "lorareg": lorareg.__version__, "machine": platform.machine()},
        "methods": METHODS, "flag_threshold": FLAG_THRESHOLD}
    try:
        if "lm" in parts:
            import lm

            b = lm.TINY if tiny else lm.Budget()
            t = time.perf_counter()
            if reuse:
                log(f"lm: reusing the models and LoRAs in {work / 'lm'} (--reuse-work); training only what is missing")
            results["lm"] = {"budget": b.__dict__, "build": lm.build(work / "lm", b, log, reuse=reuse)}
            if not skip_methods:
                results["lm"].update(lm.evaluate(work / "lm", b, METHODS, THRESHOLDS, log))
            if refine_steps:
                results["lm"]["distill"] = {}
                for target in refine_targets:
                    if "negative" in lm.DISTILL_KINDS.get(target, ""):
                        steps = list(refine_steps[-1:]) if tiny else [UNRELATED_STEPS]
                        kw = {"lrs": (), "force_unrelated": True}
                    else:
                        steps, kw = list(refine_steps), {}
                    results["lm"]["distill"][target] = lm.evaluate_distill(work / "lm", b, steps, log, target=target, **kw)
            results["lm"]["wall_s"] = time.perf_counter() - t
        if "dit" in parts:
            results["dit"] = run_dit(work / "dit", tiny, refine_steps, reuse, log)
            results["wall_s"] = time.perf_counter() - t_start
            results["cpu_s"] = time.process_time() - cpu_start
            write_dit(results, out)
            log(f"done in {results['wall_s']:.0f} s -> {out / 'results_dit.json'}, {out / 'RESULTS.md'} (DiT section)")
            return results
        if "diffusion" in parts and skip_methods and not refine_steps:
            log("diffusion: skipped (--skip-methods without --refine-steps)")
        elif "diffusion" in parts:
            try:
                import sklearn  # noqa: F401
            except ImportError:
                log("diffusion: skipped (scikit-learn is not installed; pip install 'lorareg[bench]')")
                results["diffusion"] = {"skipped": "scikit-learn is not installed"}
            else:
                import diffusion

                b = diffusion.TINY if tiny else diffusion.Budget()
                t = time.perf_counter()
                droot = work / "diffusion"
                if reuse and (droot / "lora-distilled.safetensors").exists():
                    log(f"diffusion: reusing the models and LoRAs in {droot} (--reuse-work)")
                    results["diffusion"] = {"budget": b.__dict__, "build": {"reused": str(droot)}}
                else:
                    results["diffusion"] = {"budget": b.__dict__, "build": diffusion.build(droot, b, log)}
                if not skip_methods:
                    results["diffusion"].update(diffusion.evaluate(droot, b, METHODS, THRESHOLDS, log))
                if refine_steps:
                    results["diffusion"]["distill"] = diffusion.evaluate_distill(droot, b, list(refine_steps), log)
                results["diffusion"]["wall_s"] = time.perf_counter() - t
        results["wall_s"] = time.perf_counter() - t_start
        results["cpu_s"] = time.process_time() - cpu_start
        try:
            results["load_average"] = os.getloadavg()
        except OSError:
            pass
        samples = results.get("diffusion", {}).pop("samples", None)
        if skip_methods:
            # the training-free tables of results.json / RESULTS.md come from a full run: keep them
            write_distill(results, out)
            log(f"done in {results['wall_s']:.0f} s -> {out / 'results_distill.json'}, {out / 'RESULTS.md'} (distill section)")
            return results
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
        (out / "RESULTS.md").write_text(report_markdown(results))
        try:
            import plots
        except ImportError:  # matplotlib missing
            log("plots: skipped (matplotlib is not installed)")
        else:
            plots.make_all(results, samples, out)
        log(f"done in {results['wall_s']:.0f} s -> {out / 'RESULTS.md'}")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return results


# ------------------------------------------------------------------ report


def pairs(results: dict):
    """(label, domain, pair dict) for every evaluated pair."""
    for domain, name in (("lm", "LM"), ("diffusion", "UNet")):
        for key, p in results.get(domain, {}).get("pairs", {}).items():
            yield f"{name} {key}", domain, p


def flagged(pair: dict, threshold: float = FLAG_THRESHOLD) -> tuple[int, int]:
    """(layers whose similarity is below the threshold, layers with a similarity)."""
    sims = list(pair.get("layer_similarity", {}).values())
    return sum(1 for s in sims if s < threshold), len(sims)


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}%"


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def best_method(results: dict) -> dict:
    """Mean gain per method over the related pairs (negative controls excluded)."""
    related = [p for _, _, p in pairs(results) if "negative" not in p["kind"]]
    acc: dict[str, list[float]] = {}
    for p in related:
        for m, r in p["methods"].items():
            if not math.isnan(r["gain"]):
                acc.setdefault(m, []).append(r["gain"])
    # only methods measured on every related pair (not e.g. the distilled pair's no-alignment variant)
    return {m: sum(v) / len(v) for m, v in acc.items() if len(v) == len(related)}


def report_markdown(results: dict) -> str:
    env = results["environment"]
    L = ["# Fidelity benchmark: do ported LoRAs work?", ""]
    if results["tiny"]:
        L += ["**Tiny variant (`--tiny`): a few training steps of everything. It checks the pipeline; its numbers mean nothing.**", ""]
    L += [f"Produced by `python bench/fidelity/run.py{' --tiny' if results['tiny'] else ''}` (fixed seeds) in {results['wall_s'] / 60:.1f} min "
          f"on {results['threads']} CPU thread(s)" + (f" ({results['cpu_s'] / 60:.1f} CPU-min; load average at the end "
          f"{', '.join(f'{x:.1f}' for x in results.get('load_average', []))})" if "cpu_s" in results else "") + f"; Python {env['python']}, torch {env['torch']}, lorareg {env['lorareg']}.", "",
          "Gain recovered = (loss_none − loss_port) / (loss_none − loss_retrained): 100% = as good as a LoRA retrained on the target "
          "with the same budget, 0% = no better than no adapter. Loss: held-out task loss (LM: nats/byte on held-out topics of the "
          "Python language reference; UNet: ε-prediction MSE on held-out inverted digits).", ""]
    methods = results["methods"] + (["copy (no block alignment)"] if "diffusion" in results and "pairs" in results["diffusion"] else [])
    L += ["## Gain recovered", "", "| pair | kind | loss none | loss retrained | " + " | ".join(methods) + " |",
          "|---|---|---|---|" + "---|" * len(methods)]
    for label, _, p in pairs(results):
        cells = [_pct(p["methods"][m]["gain"]) if m in p["methods"] else "" for m in methods]
        L.append(f"| {label} | {p['kind']} | {_f(p['loss_none'], 4)} | {_f(p['loss_retrained'], 4)} | " + " | ".join(cells) + " |")
    L += ["", "Source LoRA on its own base (the ceiling a training-free port can carry): " + "; ".join(
        f"{d.upper()} v1 {_f(results[d]['source']['loss_none'], 4)} → {_f(results[d]['source']['loss_lora'], 4)}"
        for d in ("lm", "diffusion") if "source" in results.get(d, {})) + ".", ""]
    L += ["## Layers, similarity and the negative control", "",
          "| pair | method | loss | layers ported | skipped | mean similarity | min similarity | energy kept | aligned blocks | port time |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for label, _, p in pairs(results):
        for m, r in p["methods"].items():
            L.append(f"| {label} | {m} | {_f(r['loss'], 4)} | {r['ported']} | {r['skipped']} | {_f(r['mean_similarity'])} | {_f(r['min_similarity'])} | "
                     f"{_pct(r['energy_kept'])} | {r.get('aligned_layers', '–')} | {r['port_s']:.2f} s |")
    L += ["", f"Similarity filter at threshold {FLAG_THRESHOLD} (layers whose subspace similarity is below it are not ported):", ""]
    for label, _, p in pairs(results):
        below, n = flagged(p)
        verdict = "**flagged**: nothing ported" if n and below == n else ("flagged in part" if below else "passes")
        L.append(f"* {label} ({p['kind']}): {below} of {n} layers below {FLAG_THRESHOLD} → {verdict}")
    L += ["", "## Loss vs similarity threshold (copy / prolora-full)", "",
          "| pair | method | " + " | ".join(f"≥{t}" for t in THRESHOLDS) + " |", "|---|---|" + "---|" * len(THRESHOLDS)]
    for label, _, p in pairs(results):
        for m, sweep in p["threshold_sweep"].items():
            L.append(f"| {label} | {m} | " + " | ".join(f"{_pct(s['gain'])} ({s['layers']})" for s in sweep) + " |")
    L += ["", "Cells: gain recovered (layers kept).", ""]
    avg = best_method(results)
    if avg:
        L += ["## Default method from the data", "", "Mean gain recovered over the related pairs: " + ", ".join(
            f"{m} {_pct(g)}" for m, g in sorted(avg.items(), key=lambda kv: -kv[1])) + ".", ""]
    L += ["## Set-up and wall time", ""]
    for d in ("lm", "diffusion"):
        r = results.get(d)
        if not r or "build" not in r:
            continue
        b = r["build"]
        L.append(f"* {d}: budget {json.dumps(r['budget'])}; ‖W₂−W₁‖/‖W₁‖ = {b['weight_change_v1_v2']:.3f}"
                 + (f", ‖W₃−W₁‖/‖W₁‖ = {b['weight_change_v1_v3']:.3f}" if "weight_change_v1_v3" in b else "")
                 + f"; training {b['build_s']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in b['timings'].items())}); total {r['wall_s']:.0f} s")
    L.append("")
    if "distill" in results.get("lm", {}):
        L += distill_markdown(results)
    if "distill" in results.get("diffusion", {}):
        L += unet_distill_markdown(results)
    return "\n".join(L)


def distill_markdown(results: dict) -> list[str]:
    """The `--refine distill` section (LM pairs): a summary over the targets, then each target's rows."""
    lm, targets = results["lm"], results["lm"]["distill"]
    build = lm.get("build", {})
    trained = [k[len("train_"):-len("_s")] for k in build.get("timings", {}) if k != "train_loras_s"]
    L = [DISTILL_HEADING, "",
         f"Produced by `{results['command']}` (fixed seeds) in {results['wall_s'] / 60:.1f} min on {results['threads']} CPU thread(s)"
         + (f"; load average at the end {', '.join(f'{x:.1f}' for x in results['load_average'])}" if "load_average" in results else "")
         + f"; Python {results['environment']['python']}, torch {results['environment']['torch']}. "
         + (f"Reused from the work folder (trained earlier, same budget and seeds): {', '.join(build['reused'])}. " if build.get("reused") else "")
         + (f"Trained by this command: {', '.join(trained)} and the missing LoRAs ({build['timings']['train_loras_s']:.0f} s). " if trained else "")
         + "Gain recovered uses the same formula as above, with each target's own loss none / loss retrained; times are ratios "
         "to retraining the LoRA on the same target, timed in the same run.", ""]
    budgets = sorted({r["steps"] for d in targets.values() for r in d["rows"] if r["lr"] == d["rows"][0]["lr"]})
    L += ["| pair | kind | ‖W−W₁‖/‖W₁‖ | mean similarity | related | `--refine distill` without force | copy | "
          + " | ".join(f"{s} steps" for s in budgets) + " | teacher (ceiling) | × retraining at 100 steps |",
          "|---|---|---|---|---|---|---|" + "---|" * len(budgets) + "---|---|"]
    for t, d in targets.items():
        default = [r for r in d["rows"] if r["lr"] == d["rows"][0]["lr"]] if d["rows"] else []
        by_steps = {r["steps"]: r for r in default}
        change = build.get(f"weight_change_v1_{t}")
        refusal = f"refused{' (rows forced)' if d.get('forced') else ''}" if d.get("refused") else "runs"
        ratio = f"{by_steps[100]['time_ratio']:.2f}" if 100 in by_steps else "–"
        L.append(f"| LM v1->{t} | {d.get('kind', '')} | {_f(change)} | {_f(d.get('related_similarity'))} | "
                 f"{'yes' if d.get('related') else '**no (flagged)**' if d.get('related') is False else '–'} | {refusal} | {_pct(d['copy']['gain'])} | "
                 + " | ".join(f"{100 * by_steps[s]['gain']:.1f}%" if s in by_steps else "" for s in budgets)
                 + f" | {_pct(d['teacher_gain'])} | {ratio} |")
    L.append("")
    for t, d in targets.items():
        L += [f"### LM v1->{t}: {d.get('kind', '')}", "",
              f"Loss none {_f(d['loss_none'], 4)}, retrained {_f(d['loss_retrained'], 4)}, teacher (v1 + LoRA on v1) {_f(d['loss_teacher'], 4)}. "
              f"`lorareg port --refine distill` from the copied LoRA: {d['samples']} samples of {d['sample_length']} "
              f"bytes generated once from v1 + LoRA (temperature 1), KL(teacher ‖ student) on the target. Copy alone: {_pct(d['copy']['gain'])}. "
              f"Teacher (v1 + LoRA) scored with the target's formula: {_pct(d['teacher_gain'])} (the ceiling). Retraining the LoRA on the target "
              f"(the reference) took {d['retrain_s']:.1f} s in this run. General-text loss (the standard library's test suite, never trained on): "
              f"target without LoRA {_f(d['general_loss_none'], 4)}, with the copied LoRA {_f(d['copy']['general_loss'], 4)}.", ""]
        if d.get("refused"):
            L += [f"Port report: `totals.related` = {d['related']}, `totals.related_similarity` = {_f(d['related_similarity'])}. "
                  f"Without `force_unrelated=True`, `lorareg.port(..., refine=\"distill\")` refuses: `{d['refused']}`"
                  + (". The rows below are forced with `force_unrelated=True`." if d.get("forced") else "."), ""]
        if not d["rows"]:
            continue
        L += ["| steps | lr | gain recovered | of the teacher's | task loss | general-text loss | KL start → end | wall time | × retraining |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in d["rows"]:
            L.append(f"| {r['steps']} | {r['lr']:g} | {100 * r['gain']:.1f}% | {_pct(r['teacher_fraction'])} | {_f(r['loss'], 4)} | {_f(r['general_loss'], 4)} | "
                     f"{r['kl_start']:.4f} → {r['kl_end']:.4f} | {r.get('refine_with_sampling_s', r['refine_s']):.1f} s | {r['time_ratio']:.2f} |")
        L.append("")
    L += ["Wall time: the refinement (generating the samples + training; the samples are generated once per target and cached, their "
          "time is counted in every row), on the same machine and threads as the retraining. The general-text loss column is the target's "
          "loss on general code with the refined LoRA applied (compare: without LoRA, with the copied LoRA). The extra rows at 50 steps "
          "use other learning rates.", ""]
    return L


def unet_distill_markdown(results: dict) -> list[str]:
    """The `--refine distill` section of the diffusion pairs."""
    from lorareg.refine.unet import DEFAULT_LR

    assert DEFAULT_LR == UNET_DEFAULT_LR, "update UNET_DEFAULT_LR"
    d = results["diffusion"]["distill"]
    L = [UNET_DISTILL_HEADING, "",
         f"Produced by `{results['command']}` (fixed seeds) on {results['threads']} CPU thread(s)"
         + (f"; load average at the end {', '.join(f'{x:.1f}' for x in results['load_average'])}" if "load_average" in results else "")
         + ". `lorareg port --refine distill` from the copied LoRA with lorareg's default settings (teacher latents: DDIM from noise "
         f"on the family's cosine schedule, each noised at random timesteps; MSE to the teacher's ε). Conditions: {d['conditions']} "
         "(this UNet has no text encoder). Times are ratios to retraining the LoRA on the same target, timed in the same run.", "",
         "| pair | kind | copy | " + " | ".join(f"{r['steps']} steps" for r in next(iter(d["pairs"].values()))["rows"] if r["lr"] == UNET_DEFAULT_LR)
         + " | teacher (ceiling) | × retraining at 100 steps |"]
    L.append("|---|---|---|" + "---|" * sum(1 for r in next(iter(d["pairs"].values()))["rows"] if r["lr"] == UNET_DEFAULT_LR) + "---|---|")
    for name, p in d["pairs"].items():
        default = [r for r in p["rows"] if r["lr"] == UNET_DEFAULT_LR]
        at100 = next((r for r in default if r["steps"] == 100), None)
        ratio = f"{at100['time_ratio']:.2f}" if at100 else "–"
        L.append(f"| UNet {name} | {p['kind']} | {_pct(p['copy']['gain'])} | " + " | ".join(f"{100 * r['gain']:.1f}%" for r in default)
                 + f" | {_pct(p['teacher_gain'])} | {ratio} |")
    L.append("")
    for name, p in d["pairs"].items():
        L += [f"### UNet {name}: {p['kind']}", "",
              f"Loss none {_f(p['loss_none'], 4)}, retrained {_f(p['loss_retrained'], 4)}, teacher (v1 + LoRA on v1) {_f(p['loss_teacher'], 4)}. "
              f"Retraining the LoRA on the target took {p['retrain_s']:.1f} s in this run. Plain-digit loss (what the style LoRA should "
              f"leave alone): no LoRA {_f(p['plain_loss_none'], 4)}, copied LoRA {_f(p['copy']['plain_loss'], 4)}.", "",
              "| steps | lr | gain recovered | of the teacher's | task loss | plain-digit loss | MSE start → end | wall time | × retraining |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            L.append(f"| {r['steps']} | {r['lr']:g} | {100 * r['gain']:.1f}% | {_pct(r['teacher_fraction'])} | {_f(r['loss'], 4)} | "
                     f"{_f(r['plain_loss'], 4)} | {r['mse_start']:.4f} → {r['mse_end']:.4f} | {r['refine_with_sampling_s']:.1f} s | {r['time_ratio']:.2f} |")
        L.append("")
    s0 = next(iter(d["pairs"].values()))["rows"][0]["settings"]
    L += [f"Settings (lorareg's defaults): {', '.join(f'{k} {v}' for k, v in s0.items())}. The extra rows at 100 steps use other "
          "learning rates.", ""]
    return L


def _replace_section(text: str, heading: str, section: str) -> str:
    i = text.find(heading)
    if i < 0:
        return text.rstrip("\n") + "\n\n" + section
    j = text.find("\n## ", i + 1)
    return text[:i] + section + ("\n" + text[j + 1 :] if j >= 0 else "")


def write_distill(results: dict, out: Path) -> None:
    """results_distill.json, and RESULTS.md's distill sections replaced (or appended); the rest, and the part not run, kept."""
    keep = ("command", "threads", "environment", "wall_s", "cpu_s", "load_average")
    path = out / "results_distill.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    run_info = {k: results[k] for k in keep if k in results}
    if "distill" in results.get("lm", {}):
        lm = results["lm"]
        data.update({"lm_distill": lm["distill"], "lm_budget": lm.get("budget"), "lm_build": lm.get("build"), **run_info})
    if "distill" in results.get("diffusion", {}):
        dif = results["diffusion"]
        data["diffusion_distill"] = {**dif["distill"], "budget": dif.get("budget"), "run": run_info}
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    md = out / "RESULTS.md"
    text = md.read_text() if md.exists() else "# Fidelity benchmark: do ported LoRAs work?\n\n"
    if "distill" in results.get("lm", {}):
        text = _replace_section(text, DISTILL_HEADING, "\n".join(distill_markdown(results)))
    if "distill" in results.get("diffusion", {}):
        text = _replace_section(text, UNET_DISTILL_HEADING, "\n".join(unet_distill_markdown(results)))
    md.write_text(text)


def run_dit(root: Path, tiny: bool, refine_steps: tuple[int, ...], reuse: bool, log) -> dict:
    """The DiT pairs (dit.py): build (or reuse) the models and LoRAs, then every row."""
    try:
        import sklearn  # noqa: F401  (the digits)
    except ImportError:
        log("dit: skipped (scikit-learn is not installed; pip install 'lorareg[bench]')")
        return {"skipped": "scikit-learn is not installed"}
    import dit

    b = dit.TINY if tiny else dit.Budget()
    t = time.perf_counter()
    if reuse and (root / "lora-i2v.safetensors").exists() and (root / "unrelated").exists():
        log(f"dit: reusing the models and LoRAs in {root} (--reuse-work)")
        build = {**json.loads((root / "build.json").read_text()), "reused": str(root)} if (root / "build.json").exists() else {"reused": str(root)}
    else:
        build = dit.build(root, b, log)
    steps = list(refine_steps) if refine_steps else ([1] if tiny else [25, 50, 100, 200])
    res = {"budget": b.__dict__, "build": build, **dit.evaluate(root, b, steps, log)}
    res["wall_s"] = time.perf_counter() - t
    return res


def write_dit(results: dict, out: Path) -> None:
    """results_dit.json, and RESULTS.md's DiT section replaced (or appended); the rest kept."""
    import dit

    keep = ("command", "threads", "environment", "wall_s", "cpu_s", "tiny")
    data = {**{k: results[k] for k in keep if k in results}, **results["dit"]}
    try:
        data["load_average"] = os.getloadavg()
    except OSError:
        pass
    (out / "results_dit.json").write_text(json.dumps(data, indent=1, default=float) + "\n")
    if "skipped" in data:
        return
    md = out / "RESULTS.md"
    text = md.read_text() if md.exists() else "# Fidelity benchmark: do ported LoRAs work?\n\n"
    md.write_text(_replace_section(text, dit.HEADING, "\n".join(dit.markdown(data))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a few steps of everything: checks the pipeline in < 1 min")
    ap.add_argument("--out", type=Path, default=None, help="where RESULTS.md, results.json and the plots go (default: bench/fidelity; --tiny: a temp folder)")
    ap.add_argument("--work", type=Path, help="keep the trained models and LoRAs here (default: a temp folder, removed)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, 1 with --tiny; use 1 on a busy machine)")
    ap.add_argument("--only", choices=["lm", "diffusion", "dit"], help="run one part (dit: the flow-matching DiT pairs, never run by default)")
    ap.add_argument("--refine-steps", default="", help="also evaluate `port --refine distill` on the LM pairs at these step budgets, e.g. 25,50,100")
    ap.add_argument("--refine-targets", default="v2,v4,v3", help=f"the LM targets of the distill rows (default: all; the negative control v3 at {UNRELATED_STEPS} steps, forced)")
    ap.add_argument("--reuse-work", action="store_true", help="reuse models and LoRAs already trained in --work (train only the missing ones)")
    ap.add_argument("--skip-methods", action="store_true", help="skip the training-free tables and diffusion: only the distill rows, into results_distill.json and RESULTS.md's distill section")
    args = ap.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="lorareg-fidelity-out-")) if args.tiny else HERE)
    parts = (args.only,) if args.only else ("lm", "diffusion")
    threads = args.threads or (1 if args.tiny else None)
    steps = tuple(int(x) for x in args.refine_steps.split(",") if x.strip())
    targets = tuple(x.strip() for x in args.refine_targets.split(",") if x.strip())
    command = shlex.join(["python", "bench/fidelity/run.py", *(sys.argv[1:] if argv is None else argv)])
    run(out, tiny=args.tiny, work=args.work, threads=threads, parts=parts, 
        refine_steps=steps, refine_targets=targets, reuse=args.reuse_work, skip_methods=args.skip_methods, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
