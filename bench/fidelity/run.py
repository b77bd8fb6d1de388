#!/usr/bin/env python
"""Fidelity benchmark: do ported LoRAs work? Reproduces everything from scratch with fixed seeds.

    python bench/fidelity/run.py            # full run (~15-20 min on 2 CPU cores), writes bench/fidelity/RESULTS.md + PNGs
    python bench/fidelity/run.py --tiny     # a few steps of everything (< 1 min): the pipeline, not the numbers

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
    import inspect

    from lorareg.engine import METHODS as ENGINE
    from lorareg.port import port

    default = inspect.signature(port).parameters["method"].default
    return list(dict.fromkeys([default, "copy", *ENGINE]))
THRESHOLDS = [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
#: the similarity below which a pair is reported as "flagged" (not related enough to port)
FLAG_THRESHOLD = 0.5


def _setup_env(work: Path) -> None:
    roots = [str(HERE / "data")] + [p for p in os.environ.get("LORAREG_DATA_PATH", "").split(os.pathsep) if p]
    os.environ["LORAREG_DATA_PATH"] = os.pathsep.join(roots)
    os.environ["LORAREG_CACHE"] = str(work / "bases-cache")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run(out: Path, *, tiny: bool = False, work: Path | None = None, threads: int | None = None, parts=("lm", "diffusion"),
        write_example: bool = False, refine_steps: tuple[int, ...] = (), reuse: bool = False, skip_methods: bool = False, log=_log) -> dict:
    """Build everything, evaluate, write results.json, RESULTS.md and plots into ``out``; returns the results."""
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
    results = {"tiny": tiny, "threads": torch.get_num_threads(), "environment": {
        "python": platform.python_version(), "torch": torch.__version__, "lorareg": lorareg.__version__, "machine": platform.machine()},
        "methods": METHODS, "flag_threshold": FLAG_THRESHOLD}
    try:
        if "lm" in parts:
            import lm

            b = lm.TINY if tiny else lm.Budget()
            t = time.perf_counter()
            if reuse and (work / "lm" / "lora-v2").exists():
                log(f"lm: reusing the models and LoRAs in {work / 'lm'} (--reuse-work)")
                results["lm"] = {"budget": b.__dict__, "reused": str(work / "lm")}
            else:
                results["lm"] = {"budget": b.__dict__, "build": lm.build(work / "lm", b, log)}
            if not skip_methods:
                results["lm"].update(lm.evaluate(work / "lm", b, METHODS, THRESHOLDS, log))
            if refine_steps:
                results["lm"]["distill"] = lm.evaluate_distill(work / "lm", b, list(refine_steps), log)
            results["lm"]["wall_s"] = time.perf_counter() - t
            if write_example:
                import export_example

                export_example.export(work / "lm", log=log)
        if "diffusion" in parts:
            try:
                import sklearn  # noqa: F401
            except ImportError:
                log("diffusion: skipped (scikit-learn is not installed; pip install 'lorareg[bench]')")
                results["diffusion"] = {"skipped": "scikit-learn is not installed"}
            else:
                import diffusion

                b = diffusion.TINY if tiny else diffusion.Budget()
                t = time.perf_counter()
                results["diffusion"] = {"budget": b.__dict__, "build": diffusion.build(work / "diffusion", b, log)}
                results["diffusion"].update(diffusion.evaluate(work / "diffusion", b, METHODS, THRESHOLDS, log))
                results["diffusion"]["wall_s"] = time.perf_counter() - t
        results["wall_s"] = time.perf_counter() - t_start
        results["cpu_s"] = time.process_time() - cpu_start
        try:
            results["load_average"] = os.getloadavg()
        except OSError:
            pass
        samples = results.get("diffusion", {}).pop("samples", None)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
        (out / "RESULTS.md").write_text(report_markdown(results))
        try:
            import plots
        except ImportError:  # matplotlib missing
            log("plots: skipped (matplotlib is not installed)")
        else:
            if skip_methods:
                log("plots: skipped (--skip-methods)")
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
    if "distill" in results.get("lm", {}):
        L += distill_markdown(results["lm"]["distill"])
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
    return "\n".join(L)


def distill_markdown(d: dict) -> list[str]:
    """The `--refine distill` table (LM pair)."""
    L = [f"## Refinement: data-free self-distillation (LM v1->{d['target']})", "",
         f"`lorareg port --refine distill` from the copied LoRA: 64 samples of {d['sample_length']} "
         f"bytes generated once from v1 + LoRA (temperature 1), KL(teacher ‖ student) on the target. Copy alone: {_pct(d['copy']['gain'])}. "
         f"Teacher (v1 + LoRA) scored with the target's formula: {_pct(d['teacher_gain'])} (the ceiling). Retraining the LoRA on the target "
         f"(the reference) took {d['retrain_s']:.1f} s in this run. General-text loss (the standard library's test suite, never trained on): "
         f"target without LoRA {_f(d['general_loss_none'], 4)}, with the copied LoRA {_f(d['copy']['general_loss'], 4)}.", "",
         "| steps | lr | gain recovered | of the teacher's | task loss | general-text loss | KL start → end | wall time | × retraining |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        L.append(f"| {r['steps']} | {r['lr']:g} | {100 * r['gain']:.1f}% | {_pct(r['teacher_fraction'])} | {_f(r['loss'], 4)} | {_f(r['general_loss'], 4)} | "
                 f"{r['kl_start']:.4f} → {r['kl_end']:.4f} | {r.get('refine_with_sampling_s', r['refine_s']):.1f} s | {r['time_ratio']:.2f} |")
    L += ["", "Wall time: the refinement (generating the samples + training; the samples are generated once and cached, their time is "
          "counted in every row), on the same machine and threads as the retraining. The general-text loss column is the target's "
          "loss on general code with the refined LoRA applied (compare: without LoRA, with the copied LoRA above).", ""]
    return L


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a few steps of everything: checks the pipeline in < 1 min")
    ap.add_argument("--out", type=Path, default=None, help="where RESULTS.md, results.json and the plots go (default: bench/fidelity; --tiny: a temp folder)")
    ap.add_argument("--work", type=Path, help="keep the trained models and LoRAs here (default: a temp folder, removed)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, 1 with --tiny; use 1 on a busy machine)")
    ap.add_argument("--only", choices=["lm", "diffusion"], help="run one half")
    ap.add_argument("--write-example", action="store_true", help="also export the LM pair as lorareg's embedded example (lorareg/examples/lm)")
    ap.add_argument("--refine-steps", default="", help="also evaluate `port --refine distill` on the LM pair at these step budgets, e.g. 25,50,100")
    ap.add_argument("--reuse-work", action="store_true", help="reuse models and LoRAs already trained in --work (skip training)")
    ap.add_argument("--skip-methods", action="store_true", help="skip the training-free method table (with --refine-steps: only the distill rows)")
    args = ap.parse_args(argv)
    out = args.out or (Path(tempfile.mkdtemp(prefix="lorareg-fidelity-out-")) if args.tiny else HERE)
    parts = (args.only,) if args.only else ("lm", "diffusion")
    threads = args.threads or (1 if args.tiny else None)
    steps = tuple(int(x) for x in args.refine_steps.split(",") if x.strip())
    run(out, tiny=args.tiny, work=args.work, threads=threads, parts=parts, write_example=args.write_example,
        refine_steps=steps, reuse=args.reuse_work, skip_methods=args.skip_methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
