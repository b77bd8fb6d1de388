"""The offline first-contact job, on the examples that ship inside the package.

1. Port: the embedded LM example (lorareg/examples/lm: a byte-level Llama v1 -> v2 checkpoint pair and
   a task LoRA trained on v1) is ported v1 -> v2 with the default method and the default projection,
   and the ported LoRA is evaluated on the example's held-out text: layers ported, subspace
   similarity, loss with no adapter / ported / retrained on v2, and the gain recovered.
2. Convert: the embedded SD1.5 kohya LoRA is converted kohya -> diffusers -> kohya and checked bit-exact.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional

from pydantic import BaseModel

from ..core.io import open_tensors
from ..engine import DEFAULT_PROJECTION
from ..evaluate import LossEvaluator, gain, lora_deltas, tokenize, windows
from ..formats import api
from ..port import PortOptions, port
from ..refine.runtime import load_causal_lm
from ..registry.examples import example_path, example_registry, lm_example_path

class DemoStep(BaseModel):
    action: str
    output: str
    format: str
    tensors: int


class PortedVariant(BaseModel):
    method: str
    output: str
    layers: int
    layers_ported: int
    layers_skipped: int
    mean_similarity: Optional[float] = None
    min_similarity: Optional[float] = None
    energy_kept: Optional[float] = None
    loss: float
    gain_recovered: Optional[float] = None


class PortDemo(BaseModel):
    example: str
    source_model: str
    target_model: str
    lora: str
    heldout: str
    heldout_tokens: int
    loss_source_none: float  # v1, no adapter
    loss_source_lora: float  # v1 + its LoRA (what the LoRA does where it was trained)
    loss_none: float  # v2, no adapter
    loss_retrained: float  # v2 + the same LoRA recipe trained on v2 (the reference)
    variants: list[PortedVariant]
    seconds: float


class DemoResult(BaseModel):
    port: Optional[PortDemo] = None
    port_skipped: Optional[str] = None
    example: str
    detected_format: str
    detected_family: str
    modules: int
    steps: list[DemoStep]
    round_trip_bit_exact: bool
    max_delta_error: float


def demo_methods() -> list[str]:
    """`lorareg port`'s default method, plain copy and the default projection, side by side."""
    default = PortOptions.model_fields["method"].default
    return list(dict.fromkeys([default, "copy", DEFAULT_PROJECTION]))


def run_port_demo(out: Path, methods: Optional[list[str]] = None) -> PortDemo:
    t0 = time.perf_counter()
    ex = lm_example_path()
    meta = json.loads((ex / "example.json").read_text(encoding="utf-8"))
    src, tgt, lora = ex / meta["source_model"], ex / meta["target_model"], ex / meta["lora"]
    text = (ex / meta["heldout"]).read_bytes()
    with example_registry():
        v1 = load_causal_lm(src)
        ids, _ = tokenize(text, src, v1, meta.get("tokenizer", "auto"))
        held = windows(ids, int(meta.get("seq_len", 128)))
        source_lora = api.load(lora, family=meta["family"])
        ev1 = LossEvaluator(v1, held)
        loss_src_none, loss_src_lora = ev1.loss(), ev1.loss(lora_deltas(v1, source_lora))
        del ev1, v1
        v2 = load_causal_lm(tgt)
        ev = LossEvaluator(v2, held)
        none = ev.loss()
        ref = ev.loss(lora_deltas(v2, api.load(ex / meta["reference_lora"], family=meta["family"])))
        variants = []
        for method in methods or demo_methods():
            dest = out / f"lora-v2-{method}"
            res = port(source_lora, source_model=str(src), target_model=str(tgt), method=method, output=dest, force=True,
                       progress=False, device="cpu", cache_dir=out / "bases-cache",
                       check="bases")  # every variant reports its subspace similarity (copy's default check has none)
            loss = ev.loss(lora_deltas(v2, api.load(dest, family=meta["family"])))
            t = res.report.totals
            variants.append(PortedVariant(method=method, output=str(dest), layers=t.layers, layers_ported=t.ported, layers_skipped=t.skipped,
                                          mean_similarity=t.mean_similarity, min_similarity=t.min_similarity, energy_kept=t.energy_kept,
                                          loss=loss, gain_recovered=gain(none, loss, ref)))
    return PortDemo(example=str(ex), source_model=str(src), target_model=str(tgt), lora=str(lora), heldout=str(ex / meta["heldout"]),
                    heldout_tokens=int(held.numel()), loss_source_none=loss_src_none, loss_source_lora=loss_src_lora,
                    loss_none=none, loss_retrained=ref, variants=variants, seconds=round(time.perf_counter() - t0, 2))


def run_demo(out_dir: Optional[Path] = None, *, port: bool = True) -> DemoResult:
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="lorareg-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    port_part, port_skipped = None, None
    if port:
        try:
            import transformers  # noqa: F401
        except ImportError:
            port_skipped = "the port part needs transformers (pip install transformers)"
        else:
            port_part = run_port_demo(out)
    src = example_path()
    info = api.inspect(src)
    original = api.load(src)
    steps = []
    diffusers = out / "example-diffusers.safetensors"
    back = out / "example-kohya-again.safetensors"
    for target, path in (("diffusers", diffusers), ("kohya", back)):
        source = src if target == "diffusers" else diffusers
        rep = api.convert(source, path, to=target, force=True)
        steps.append(DemoStep(action=f"convert {source.name} -> {target}", output=str(path), format=rep.target_format, tensors=rep.tensors_out))
    converted = api.load(diffusers)
    worst = 0.0
    for key, m in original.modules.items():
        a, b = m.delta_weight(), converted.modules[key].delta_weight()
        worst = max(worst, float((a - b).abs().max()))
    a_t, _, _ = open_tensors(src)
    b_t, _, _ = open_tensors(back)
    exact = set(a_t) == set(b_t) and all(a_t[k].raw_bytes() == b_t[k].raw_bytes() and a_t[k].dtype == b_t[k].dtype for k in a_t)
    return DemoResult(
        port=port_part,
        port_skipped=port_skipped,
        example=str(src),
        detected_format=f"{info.format}/{info.variant}",
        detected_family=info.family,
        modules=info.num_modules,
        steps=steps,
        round_trip_bit_exact=exact,
        max_delta_error=worst,
    )


def port_summary(p: PortDemo) -> list[str]:
    lines = [
        f"port      {p.lora}: {Path(p.source_model).name} -> {Path(p.target_model).name} (byte-level Llama checkpoint pair, offline)",
        f"  held-out text {p.heldout} ({p.heldout_tokens} bytes); loss in nats/byte",
        f"  v1: no adapter {p.loss_source_none:.4f}, with its LoRA {p.loss_source_lora:.4f}",
        f"  v2: no adapter {p.loss_none:.4f}, LoRA retrained on v2 {p.loss_retrained:.4f} (the reference)",
    ]
    for v in p.variants:
        sim = f"similarity mean {v.mean_similarity:.3f} min {v.min_similarity:.3f}" if v.mean_similarity is not None else "similarity n/a"
        g = f"{100 * v.gain_recovered:.0f}%" if v.gain_recovered is not None else "n/a"
        lines.append(f"  {v.method:<13} {v.layers_ported}/{v.layers} layers ported, {sim}; loss {v.loss:.4f}, gain recovered {g}")
    return lines
