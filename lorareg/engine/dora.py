"""DoRA's magnitude (arXiv 2402.09353): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, one norm per unit of one axis.

Layouts (facts from the loaders' code):
- PEFT: ``lora_magnitude_vector`` is one value per OUTPUT row, the norm over dim 1 of the (out, in)
  weight (a vector [out] for Linear; [1, out, 1, 1] for Conv2d, the norm over every axis but 0).
- LyCORIS (``dora_scale``, also what kohya-style loaders read): ``wd_on_out=True`` (its default) is
  per output row, stored [out, 1(, 1, 1)]; ``wd_on_out=False`` per INPUT channel, the norm over
  (out, kh, kw), stored [1, in(, 1, 1)].

Porting transfers the change the magnitude made, not the magnitude: each unit of the merged weight
is rescaled by s = m / ‖W_src + ΔW_src‖, so on the target m_tgt = s · ‖W_tgt + ΔW_tgt‖ (with ΔW_tgt the
ported direction) and W'_tgt = s ⊙ (W_tgt + ΔW_tgt). On the same weight it gives m back; on a target
that is the source rescaled per unit (diag(d) W) with the direction rescaled alike, it gives
diag(d) W'_src, which copying m cannot (docs/methods.md).

Norms come from the factors in low rank (ΔW = scale · up @ down, never dense), in float64.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..core.errors import ConversionError

OUT, IN = 0, 1
PEFT_SUFFIX = "lora_magnitude_vector"


def magnitude_axis(mag_shape: Sequence[int], weight_shape: Sequence[int], peft: bool = False) -> int:
    """OUT (one value per output row) or IN (one per input channel), from the magnitude's layout."""
    out, inn = weight_shape[0], weight_shape[1]
    n = math.prod(mag_shape)
    if len(mag_shape) == 1 and n == out:
        return OUT
    if mag_shape and mag_shape[0] == out and n == out:
        return OUT
    if peft and len(mag_shape) > 1 and mag_shape[0] == 1 and mag_shape[1] == out and n == out:
        return OUT  # PEFT's conv layout [1, out, 1, 1]
    if len(mag_shape) > 1 and mag_shape[0] == 1 and mag_shape[1] == inn and n == inn:
        return IN
    raise ConversionError(f"DoRA magnitude of shape {list(mag_shape)} fits neither the outputs nor the inputs of a {list(weight_shape)} weight")


def _group(sq: torch.Tensor, weight_shape: Sequence[int]) -> torch.Tensor:
    """Per flat column -> per input channel (a conv's kh·kw columns belong to one channel)."""
    return sq.reshape(weight_shape[1], -1).sum(dim=1)


def merged_norms(weight: torch.Tensor, up: Optional[torch.Tensor], down: Optional[torch.Tensor], scale: float, axis: int,
                 weight_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """‖W + scale·up@down‖ per unit of ``axis``, without the dense product (float64)."""
    shape = tuple(weight_shape or weight.shape)
    W = weight.reshape(shape[0], -1).double()
    if axis == OUT:
        sq = (W * W).sum(dim=1)
        if up is not None:
            U, D = up.reshape(shape[0], -1).double() * scale, down.reshape(down.shape[0], -1).double()
            sq = sq + 2 * ((W @ D.T) * U).sum(dim=1) + ((U @ (D @ D.T)) * U).sum(dim=1)
        return sq.clamp_min(0).sqrt()
    sq = (W * W).sum(dim=0)
    if up is not None:
        U, D = up.reshape(shape[0], -1).double() * scale, down.reshape(down.shape[0], -1).double()
        sq = sq + 2 * ((U.T @ W) * D).sum(dim=0) + (((U.T @ U) @ D) * D).sum(dim=0)
    return _group(sq, shape).clamp_min(0).sqrt()


def unit_scale(magnitude: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """s = m / ‖W + ΔW‖ per unit (0 where the norm is 0: such a unit is zero whatever s is)."""
    m = magnitude.reshape(-1).double()
    return torch.where(norms > 0, m / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(m))


def transfer_magnitude(magnitude: torch.Tensor, src_norms: torch.Tensor, tgt_norms: torch.Tensor) -> torch.Tensor:
    """m_tgt = (m_src / ‖W_src + ΔW_src‖) · ‖W_tgt + ΔW_tgt‖, as a flat float64 vector."""
    if src_norms.numel() != tgt_norms.numel():
        raise ConversionError(f"DoRA magnitude: {src_norms.numel()} units on the source, {tgt_norms.numel()} on the target")
    return unit_scale(magnitude, src_norms) * tgt_norms


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: int) -> torch.Tensor:
    """W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ (dense; tests and refactoring), in float64, the weight's shape."""
    shape = weight.shape
    V = (weight.double() + delta.reshape(shape).double()).reshape(shape[0], -1)
    if axis == OUT:
        s = unit_scale(magnitude, V.norm(dim=1))
        return (V * s[:, None]).reshape(shape)
    norms = _group((V * V).sum(dim=0), shape).sqrt()
    s = unit_scale(magnitude, norms)
    per_col = s.repeat_interleave(V.shape[1] // shape[1])
    return (V * per_col[None, :]).reshape(shape)


def canonical(values: torch.Tensor, axis: int, ndim: int, dtype: torch.dtype) -> torch.Tensor:
    """A magnitude lorareg makes: [out] per output row (unambiguous), [1, in(, 1, 1)] per input
    channel; the writer lays it out as each format stores it."""
    shape = [-1] if axis == OUT else [1, -1] + [1] * (ndim - 2)
    return values.reshape(shape).to(dtype).contiguous()
