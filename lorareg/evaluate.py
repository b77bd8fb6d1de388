"""`lorareg eval`: held-out loss of a causal LM with and without a LoRA, and the gain a port recovers.

The LoRA's ΔW (scale included) is added to the weights of the model's matching linear layers; the
loss is the mean next-token negative log-likelihood (nats per token) over non-overlapping windows of
the data file. Tokenization: the model folder's own tokenizer (``AutoTokenizer``) when it has one;
raw UTF-8 bytes (token id = byte value) for byte-level models with a 256-entry vocabulary, such as
the embedded example and the fidelity benchmark's models.

    gain recovered = (loss_none - loss_lora) / (loss_none - loss_reference)

where ``loss_reference`` is the loss of a reference LoRA on the same target (typically one retrained
there with the same budget). With ``--source-model/--source-lora`` the gain is instead compared with
what the original LoRA achieves on its own base model ("gain retained").
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import torch
from pydantic import BaseModel

from .core.errors import InputError
from .core.lora import Lora
from .formats.api import load
from .refine.hooks import find_module
from .refine.runtime import TOKENIZER_FILES, load_causal_lm
from .registry.examples import example_registry_for

PathLike = Union[str, Path]


class EvalResult(BaseModel):
    data: str
    tokenizer: str
    seq_len: int
    windows: int
    tokens: int
    target_model: str
    lora: Optional[str] = None
    modules_applied: Optional[int] = None
    loss_none: float
    loss_lora: Optional[float] = None
    reference_lora: Optional[str] = None
    loss_reference: Optional[float] = None
    gain_recovered: Optional[float] = None
    source_model: Optional[str] = None
    source_lora: Optional[str] = None
    loss_source_none: Optional[float] = None
    loss_source_lora: Optional[float] = None
    gain_retained: Optional[float] = None


def gain(loss_none: float, loss: float, loss_reference: float) -> Optional[float]:
    """(loss_none - loss) / (loss_none - loss_reference); None when the reference gains nothing."""
    denom = loss_none - loss_reference
    if not math.isfinite(denom) or abs(denom) < 1e-9:
        return None
    return (loss_none - loss) / denom


# ---------------------------------------------------------------- models and tokens


def tokenize(text: bytes, model_ref: PathLike, model=None, tokenizer: str = "auto") -> tuple[torch.Tensor, str]:
    """Token ids of ``text`` (1-D long tensor) and the name of the tokenizer used."""
    path = Path(model_ref)
    use = tokenizer
    if use == "auto":
        if any((path / f).exists() for f in TOKENIZER_FILES):
            use = str(path)
        elif model is not None and getattr(model.config, "vocab_size", None) == 256:
            use = "bytes"
        else:
            raise InputError(f"{path}: no tokenizer files in the model folder; pass --tokenizer bytes or a tokenizer folder")
    if use == "bytes":
        return torch.frombuffer(bytearray(text), dtype=torch.uint8).long(), "bytes"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(use)
    ids = tok(text.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long), use


def windows(ids: torch.Tensor, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping windows [N, seq_len]; the incomplete tail is dropped."""
    n = ids.numel() // seq_len
    if n == 0:
        raise InputError(f"the data has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * seq_len].reshape(n, seq_len)


@torch.no_grad()
def lm_loss(model, batches: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token NLL (nats) over all predicted tokens of the windows."""
    total, count = 0.0, 0
    for i in range(0, batches.shape[0], batch_size):
        x = batches[i : i + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return total / count


# ---------------------------------------------------------------- LoRA deltas


def lora_deltas(model, lora: Lora) -> dict[str, torch.Tensor]:
    """Dense ΔW (scale included) of each LoRA module, keyed by the model's parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    missing = []
    for m in lora.modules.values():
        try:
            mod = find_module(model, m.name)
        except InputError:
            missing.append(m.name)
            continue
        dw = m.delta_weight()
        w = mod.weight
        if dw.numel() != w.numel():
            raise InputError(f"{m.key}: LoRA ΔW has shape {tuple(dw.shape)}, the model's weight {tuple(w.shape)}")
        out[names[id(w)]] = dw.reshape(w.shape)
    if missing:
        raise InputError(f"{len(missing)} LoRA modules have no layer in the model (first: {missing[0]})")
    return out


class LossEvaluator:
    """Loss of one model on fixed windows, with any set of ΔW added temporarily."""

    def __init__(self, model, batches: torch.Tensor, batch_size: int = 32):
        self.model, self.batches, self.batch_size = model, batches, batch_size
        self.params = dict(model.named_parameters())

    def loss(self, deltas: Optional[dict[str, torch.Tensor]] = None) -> float:
        deltas = deltas or {}
        saved = {}
        try:
            with torch.no_grad():
                for name, dw in deltas.items():
                    p = self.params[name]
                    saved[name] = p.detach().clone()
                    p.add_(dw.to(p.dtype))
            return lm_loss(self.model, self.batches, self.batch_size)
        finally:
            with torch.no_grad():
                for name, w in saved.items():
                    self.params[name].copy_(w)

    def lora_loss(self, lora: Union[Lora, PathLike, None]) -> float:
        if lora is None:
            return self.loss()
        return self.loss(lora_deltas(self.model, _as_lora(lora)))


def _as_lora(lora: Union[Lora, PathLike], family: Optional[str] = None) -> Lora:
    if isinstance(lora, Lora):
        return lora
    return load(lora, family=family)


# ---------------------------------------------------------------- the command's job


def evaluate(
    lora: Optional[PathLike],
    *,
    target_model: PathLike,
    data: PathLike,
    reference_lora: Optional[PathLike] = None,
    source_model: Optional[PathLike] = None,
    source_lora: Optional[PathLike] = None,
    tokenizer: str = "auto",
    seq_len: int = 128,
    max_windows: Optional[int] = None,
    batch_size: int = 32,
    family: Optional[str] = None,
) -> EvalResult:
    """Held-out loss on ``data`` of the target with no adapter and with ``lora`` (None: base only)."""
    with example_registry_for([lora, reference_lora, source_lora]):
        return _evaluate(lora, target_model, data, reference_lora, source_model, source_lora, tokenizer, seq_len, max_windows, batch_size, family)


def _evaluate(lora, target_model, data, reference_lora, source_model, source_lora, tokenizer, seq_len, max_windows, batch_size, family) -> EvalResult:
    text = Path(data).read_bytes()
    if (source_model is None) != (source_lora is None):
        raise InputError("--source-model and --source-lora go together")
    model = load_causal_lm(target_model)
    ids, tok_name = tokenize(text, target_model, model, tokenizer)
    batches = windows(ids, seq_len, max_windows)
    ev = LossEvaluator(model, batches, batch_size)
    res = EvalResult(data=str(data), tokenizer=tok_name, seq_len=seq_len, windows=int(batches.shape[0]),
                     tokens=int(batches.numel()), target_model=str(target_model), loss_none=ev.loss())
    if lora is not None:
        lo = _as_lora(lora, family)
        deltas = lora_deltas(model, lo)
        res.lora, res.modules_applied, res.loss_lora = str(lora), len(deltas), ev.loss(deltas)
    if reference_lora is not None:
        res.reference_lora, res.loss_reference = str(reference_lora), ev.lora_loss(_as_lora(reference_lora, family))
        if res.loss_lora is not None:
            res.gain_recovered = gain(res.loss_none, res.loss_lora, res.loss_reference)
    if source_model is not None:
        del ev, model
        src = load_causal_lm(source_model)
        sids, _ = tokenize(text, source_model, src, tokenizer if tokenizer != "auto" else (tok_name if tok_name == "bytes" else "auto"))
        sev = LossEvaluator(src, windows(sids, seq_len, max_windows), batch_size)
        res.source_model, res.source_lora = str(source_model), str(source_lora)
        res.loss_source_none, res.loss_source_lora = sev.loss(), sev.lora_loss(_as_lora(source_lora, family))
        if res.loss_lora is not None:
            src_gain = res.loss_source_none - res.loss_source_lora
            res.gain_retained = (res.loss_none - res.loss_lora) / src_gain if abs(src_gain) > 1e-9 else None
    return res


def summarize(res: EvalResult) -> str:
    lines = [f"{res.data}: {res.windows} windows of {res.seq_len} tokens ({res.tokenizer}) on {res.target_model}",
             f"  loss, no adapter   {res.loss_none:.4f} nats/token"]
    if res.loss_lora is not None:
        lines.append(f"  loss, with LoRA    {res.loss_lora:.4f}  ({res.modules_applied} modules; gain {res.loss_none - res.loss_lora:+.4f})")
    if res.loss_reference is not None:
        lines.append(f"  loss, reference    {res.loss_reference:.4f}  ({res.reference_lora}; gain {res.loss_none - res.loss_reference:+.4f})")
    if res.gain_recovered is not None:
        lines.append(f"  gain recovered     {100 * res.gain_recovered:.1f}% of the reference's")
    if res.loss_source_none is not None:
        lines.append(f"  source model       {res.loss_source_none:.4f} -> {res.loss_source_lora:.4f} with the source LoRA")
    if res.gain_retained is not None:
        lines.append(f"  gain retained      {100 * res.gain_retained:.1f}% of the source LoRA's gain on its own model")
    return "\n".join(lines)
