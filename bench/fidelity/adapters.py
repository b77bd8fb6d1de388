"""DoRA and SVDiff rows of the fidelity benchmark, on the LM checkpoint-upgrade pair (v1 -> v2).

    python bench/fidelity/adapters.py [--models lorareg/examples/lm] [--steps 250] [--threads 1]

The pair is the benchmark's LM v1/v2 as exported in lorareg's embedded example (fp16 weights, read in
fp32; the same task data, budget, batch order and seed as the benchmark's LoRA). On each of v1 and v2
it trains, with the same budget as the LoRA (rank 8, alpha 16, 250 steps, lr 3e-3):
- a DoRA adapter with real PEFT (``use_dora=True``) on the same 7 projections;
- an SVDiff adapter (shifts δ of every singular value of the same 7 projections, W' = U diag(ReLU(σ+δ)) Vᵀ),
  saved in svdiff-pytorch's key layout.
The v1 adapters are ported to v2 with lorareg.port and compared with none and with the same recipe
retrained on v2:  gain recovered = (loss_none − loss_port) / (loss_none − loss_retrained).
Rows: DoRA with the magnitude transferred (default) / copied / dropped; SVDiff spectral port / its
LoRA form (copy method) at ranks 8 and 64; and the plain LoRA's copy port for reference.
Prints a markdown table; ``--write`` puts it (with the command) in RESULTS.md's section below and the
numbers in results_adapters.json here; ``--from-json FILE --write`` renders an earlier run's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parents[1]
HEADING = "## Other adapter types: DoRA and SVDiff"


def _env(work: Path) -> None:
    os.environ["LORAREG_DATA_PATH"] = os.pathsep.join([str(HERE / "data")] + [p for p in os.environ.get("LORAREG_DATA_PATH", "").split(os.pathsep) if p])
    os.environ["LORAREG_CACHE"] = str(work / "bases-cache")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class SvdiffHooks:
    """SVDiff on named nn.Linear layers: the forward uses U diag(ReLU(σ + δ)) Vᵀ of the frozen weight."""

    def __init__(self, model, names):
        self.names, self.delta, self.svd, self.handles = list(names), {}, {}, []
        for name in self.names:
            mod = model.get_submodule(name)
            U, S, Vh = torch.linalg.svd(mod.weight.detach().float(), full_matrices=False)
            self.svd[name] = (U, S, Vh)
            self.delta[name] = torch.nn.Parameter(torch.zeros_like(S))
            self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(mod, inp, out):
            U, S, Vh = self.svd[name]
            return F.linear(inp[0], (U * torch.relu(S + self.delta[name])) @ Vh, mod.bias)

        return hook

    def parameters(self):
        return [self.delta[n] for n in self.names]

    def remove(self):
        for h in self.handles:
            h.remove()

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file({f"{n}.delta": self.delta[n].detach().contiguous() for n in self.names}, str(path / "spectral_shifts.safetensors"))


def train_dora(model_dir: Path, out: Path, b, sampler) -> None:
    from peft import LoraConfig, get_peft_model

    from lm import LORA_TARGETS, train
    from lorareg.evaluate import load_causal_lm

    torch.manual_seed(22)
    model = get_peft_model(load_causal_lm(model_dir), LoraConfig(r=b.rank, lora_alpha=b.alpha, target_modules=[t.split(".")[-1] for t in LORA_TARGETS],
                                                                  use_dora=True, lora_dropout=0.0))
    params = [p for p in model.parameters() if p.requires_grad]
    train(model, params, sampler, b.lora_steps, b.lora_lr, warmup=10)
    model.save_pretrained(out)


def train_svdiff(model_dir: Path, out: Path, b, sampler) -> None:
    from lm import LORA_TARGETS, train
    from lorareg.evaluate import load_causal_lm

    model = load_causal_lm(model_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    hooks = SvdiffHooks(model, [n for n, _ in model.named_modules() if n.endswith(LORA_TARGETS)])
    train(model, hooks.parameters(), sampler, b.lora_steps, b.lora_lr, warmup=10)
    hooks.remove()
    hooks.save(out)


def effective_deltas(lora, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W' − W on the model each module is applied to (DoRA: with its magnitude; SVDiff: its shifts)."""
    from lorareg.formats.base_refactor import dora_delta, svdiff_delta

    out = {}
    for m in lora.modules.values():
        w = weights[m.name + ".weight"]
        if m.kind == "svdiff":
            out[m.name + ".weight"] = svdiff_delta(m, w).float()
        elif m.dora_scale is not None:
            out[m.name + ".weight"] = dora_delta(m, w).float()
        else:
            out[m.name + ".weight"] = m.delta_weight()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=REPO / "lorareg" / "examples" / "lm", help="folder with v1/, v2/, lora-v1/, lora-v2-retrained/")
    ap.add_argument("--steps", type=int, default=None, help="training steps of each adapter (default: the benchmark's LoRA budget)")
    ap.add_argument("--eval-windows", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--write", action="store_true", help="write RESULTS.md's section and results_adapters.json here")
    ap.add_argument("--from-json", type=Path, default=None, help="render these numbers (a results_adapters.json) instead of running")
    args = ap.parse_args(argv)
    if args.from_json:
        res = json.loads(args.from_json.read_text())
        print(markdown(res))
        if args.write:
            write(res)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="lorareg-adapters-"))
    _env(work)
    import lorareg
    from lm import Budget, Sampler, as_ids, corpora
    from lorareg.evaluate import LossEvaluator, load_causal_lm, windows

    b = Budget()
    if args.steps:
        b.lora_steps = args.steps
    if args.eval_windows:
        b.eval_windows = args.eval_windows
    data = corpora()
    task, held = as_ids(data["task_train"]), windows(as_ids(data["task_heldout"]), b.seq, b.eval_windows)
    src, tgt = args.models / "v1", args.models / "v2"
    t0 = time.perf_counter()
    trained = 0
    for name, folder in (("v1", src), ("v2", tgt)):
        if not (work / f"dora-{name}").exists():
            train_dora(folder, work / f"dora-{name}", b, Sampler([(task, 1.0)], b.seq, b.batch, seed=21))
            trained += 1
        if not (work / f"svdiff-{name}").exists():
            train_svdiff(folder, work / f"svdiff-{name}", b, Sampler([(task, 1.0)], b.seq, b.batch, seed=21))
            trained += 1
    train_s = time.perf_counter() - t0 if trained else None  # None: adapters of an earlier run in --work
    fam = "fid-llama"
    v1m, v2m = load_causal_lm(src), load_causal_lm(tgt)
    w1 = {n: p.detach() for n, p in v1m.named_parameters()}
    w2 = {n: p.detach() for n, p in v2m.named_parameters()}
    ev1, ev2 = LossEvaluator(v1m, held), LossEvaluator(v2m, held)
    none = ev2.loss()
    rows = []

    def row(adapter, variant, lora_on_v2, retrained):
        loss = ev2.loss(effective_deltas(lora_on_v2, w2))
        g = (none - loss) / (none - retrained)
        rows.append({"adapter": adapter, "port": variant, "loss": loss, "retrained": retrained, "gain": g})
        print(f"{adapter:7} {variant:40} loss {loss:.4f}  retrained {retrained:.4f}  gain {100 * g:.1f}%", flush=True)

    def load(p):
        return lorareg.load(p, family=fam)

    common = dict(source_model=str(src), target_model=str(tgt), force=True, progress=False, device="cpu")
    ref_lora = ev2.loss(effective_deltas(load(args.models / "lora-v2-retrained"), w2))
    lorareg.port(load(args.models / "lora-v1"), method="copy", output=work / "p-lora", **common)
    row("LoRA", "copy (reference)", load(work / "p-lora"), ref_lora)

    dora_src = load(work / "dora-v1")
    ref_dora = ev2.loss(effective_deltas(load(work / "dora-v2"), w2))
    for mode in ("transfer", "copy", "drop"):
        lorareg.port(dora_src, method="copy", dora=mode, output=work / f"p-dora-{mode}", **common)
        row("DoRA", f"copy direction, magnitude {mode}", load(work / f"p-dora-{mode}"), ref_dora)

    sv_src = load(work / "svdiff-v1" / "spectral_shifts.safetensors")
    ref_sv = ev2.loss(effective_deltas(load(work / "svdiff-v2" / "spectral_shifts.safetensors"), w2))
    lorareg.port(sv_src, method="spectral", output=work / "p-sv-spectral.safetensors", **common)
    row("SVDiff", "spectral (same δ on v2's spectrum)", load(work / "p-sv-spectral.safetensors"), ref_sv)
    for r in (8, 64):
        lorareg.port(sv_src, method="copy", rank=r, format="peft", output=work / f"p-sv-lora{r}", **common)
        row("SVDiff", f"LoRA form (W'−W of v1) rank {r}, copy", load(work / f"p-sv-lora{r}"), ref_sv)

    src_gain = {"LoRA": ev1.loss(effective_deltas(load(args.models / "lora-v1"), w1)), "DoRA": ev1.loss(effective_deltas(dora_src, w1)),
                "SVDiff": ev1.loss(effective_deltas(sv_src, w1))}
    res = {"none_v2": none, "none_v1": ev1.loss(), "rows": rows, "source": src_gain, "train_s": train_s, "steps": b.lora_steps,
           "eval_windows": b.eval_windows, "threads": torch.get_num_threads(), "command": "python bench/fidelity/adapters.py " + " ".join(argv or sys.argv[1:])}
    print(markdown(res))
    if args.write:
        write(res)
    return 0


def markdown(res: dict) -> str:
    L = [HEADING, "", f"`{res['command']}` (LM v1 -> v2, the checkpoint upgrade; {res['steps']} training steps per adapter, "
         f"{res['eval_windows']} held-out windows; {res['threads']} thread(s), "
         + (f"training {res['train_s']:.0f} s" if res.get("train_s") else "adapters trained by an earlier run in the same --work") + "). Each adapter type's gain is "
         "relative to the same type retrained on v2.", "",
         "| adapter | port to v2 | held-out loss | retrained on v2 | gain recovered |", "|---|---|---|---|---|"]
    L += [f"| {r['adapter']} | {r['port']} | {r['loss']:.4f} | {r['retrained']:.4f} | {100 * r['gain']:.1f}% |" for r in res["rows"]]
    L += ["", f"v2 with no adapter: {res['none_v2']:.4f}; on v1: no adapter {res.get('none_v1', float('nan')):.4f}, "
          + ", ".join(f"{k} {v:.4f}" for k, v in res["source"].items()) + ".", ""]
    return "\n".join(L)


def write(res: dict) -> None:
    from run import _replace_section

    (HERE / "results_adapters.json").write_text(json.dumps(res, indent=1) + "\n")
    md = HERE / "RESULTS.md"
    md.write_text(_replace_section(md.read_text(), HEADING, markdown(res)))


if __name__ == "__main__":
    raise SystemExit(main())
