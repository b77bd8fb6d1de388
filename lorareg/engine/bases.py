"""Top-k singular bases of base-model weights.

``top_k`` / ``top_k_batched`` return the top-k left/right singular vectors of a 2-D weight (conv
weights are flattened by the caller to [out, in·kh·kw]). All math is fp32 whatever the input dtype.

Algorithm (``method="randomized"``): work on the Gram matrix of the smaller side, G = W Wᵀ
(m ≤ n after an implicit transpose); range finder Y = G Ω with a seeded Gaussian Ω of width
l = k + oversample; ``power_iters`` subspace iterations Q ← qr(G Q) (each is one power iteration
W Wᵀ with re-orthonormalisation); Rayleigh–Ritz: eigen-decomposition of the small l×l matrix
Qᵀ G Q in fp64 (equivalent to the SVD of the l×n sketch Qᵀ W), U = Q X_k, S = sqrt(λ_k),
V = Wᵀ U / S (orthonormal by construction of the Rayleigh–Ritz step).

``method="gram"``: exact top-k from a full fp32 ``eigh`` of G (same Rayleigh–Ritz formulas with
Q = I). On CPU it is cheaper than the randomized path once l is a sizeable fraction of min(m, n),
which is the case for LoRA-X's k = 320 on SD/SDXL widths; ``method="auto"`` (default) picks it on
CPU when l ≥ ``GRAM_FRACTION``·min(m, n), and the randomized path otherwise (always on CUDA).

Defaults (measured, see docs/methods.md and tests/engine/test_engine_bases.py): oversample = k (l = 2k)
and power_iters = 3 give a mean squared principal-angle cosine ≥ 0.995 against a full SVD on
power-law spectra (σ_i ∝ i^-α, α ∈ [0.5, 1]) plus a noise bulk at the level of σ_k.

Sign convention: each (u_i, v_i) pair is flipped so that the largest-magnitude entry of u_i is
positive, so results are deterministic (they also are for a fixed ``seed``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "Basis",
    "top_k",
    "top_k_batched",
    "default_k",
    "BASES_VERSION",
    "DEFAULT_POWER_ITERS",
    "GRAM_FRACTION",
]

#: Bumped whenever the numbers ``top_k`` produces change (part of cache keys).
BASES_VERSION = "bases-v1"
DEFAULT_POWER_ITERS = 3
#: On CPU, use the exact Gram eigensolver when k + oversample ≥ this fraction of min(m, n).
GRAM_FRACTION = 0.25
#: LoRA-X uses k = 320 on SD-family UNets, i.e. a quarter of the widest (1280) layers.
K_MAX = 320
K_FRACTION = 4

Method = Literal["auto", "randomized", "gram"]


@dataclass(frozen=True)
class Basis:
    """Top-k singular triplets of a weight W [m, n] ≈ U diag(S) Vᵀ (fp32)."""

    U: Tensor  # [m, k], orthonormal columns
    S: Tensor  # [k], descending, ≥ 0
    V: Tensor  # [n, k], orthonormal columns

    def __post_init__(self) -> None:
        if self.U.ndim != 2 or self.V.ndim != 2 or self.S.ndim != 1:
            raise ValueError("Basis expects U [m,k], S [k], V [n,k]")
        k = self.S.shape[0]
        if self.U.shape[1] != k or self.V.shape[1] != k:
            raise ValueError(
                f"inconsistent basis: U {tuple(self.U.shape)}, S {tuple(self.S.shape)}, "
                f"V {tuple(self.V.shape)}"
            )

    @property
    def k(self) -> int:
        return int(self.S.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (m, n) of the weight this basis came from."""
        return (int(self.U.shape[0]), int(self.V.shape[0]))

    def truncate(self, k: int) -> "Basis":
        """The top-``k`` part (a basis with larger k serves any smaller request)."""
        if k > self.k:
            raise ValueError(f"cannot truncate a k={self.k} basis to k={k}")
        if k == self.k:
            return self
        return Basis(self.U[:, :k], self.S[:k], self.V[:, :k])

    def to(self, device: torch.device | str) -> "Basis":
        return Basis(self.U.to(device), self.S.to(device), self.V.to(device))


def default_k(shape: Sequence[int]) -> int:
    """Default subspace size: ``min(320, min(m, n) // 4)`` (at least 1).

    LoRA-X uses k = 320 on SD UNets, a quarter of their widest 1280-channel layers; keeping the same
    quarter on narrower layers keeps the basis a proper subspace (k = 320 on a 320-wide layer
    would be the whole space, making every projection the identity).
    """
    m, n = int(shape[0]), int(shape[1])
    return max(1, min(K_MAX, min(m, n) // K_FRACTION))


def _resolve_device(device: torch.device | str | None, fallback: Tensor) -> torch.device:
    return torch.device(device) if device is not None else fallback.device


def _canonical_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    # U [b, m, k], V [b, n, k]: make the largest-|.| entry of each u_i positive.
    idx = U.abs().argmax(dim=1, keepdim=True)  # [b, 1, k]
    sgn = torch.gather(U, 1, idx).sign()
    sgn = torch.where(sgn == 0, torch.ones_like(sgn), sgn)
    return U * sgn, V * sgn


def _core(
    W: Tensor,
    k: int,
    *,
    oversample: int | None,
    power_iters: int,
    seed: int,
    method: Method,
) -> tuple[Tensor, Tensor, Tensor]:
    """W [b, m, n] fp32 on its compute device -> U [b,m,k], S [b,k], V [b,n,k]."""
    b, m, n = W.shape
    transposed = m > n
    if transposed:
        W = W.transpose(1, 2)
        m, n = n, m
    k = min(k, m)
    p = k if oversample is None else max(0, int(oversample))
    l = min(k + p, m)
    if method == "auto":
        use_gram = W.device.type == "cpu" and l >= GRAM_FRACTION * m
        method = "gram" if use_gram else "randomized"
    G = W @ W.transpose(1, 2)  # [b, m, m]
    if method == "gram" or l >= m:
        evals, X = torch.linalg.eigh(G)
        lam = evals.flip(-1)[:, :k]
        U = X.flip(-1)[:, :, :k]
    elif method == "randomized":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        omega = torch.randn(m, l, generator=gen, dtype=torch.float32).to(W.device)
        Q, _ = torch.linalg.qr(G @ omega)
        for _ in range(max(0, power_iters)):
            Q, _ = torch.linalg.qr(G @ Q)
        H = Q.transpose(1, 2) @ (G @ Q)  # [b, l, l]
        H = 0.5 * (H + H.transpose(1, 2))
        evals, X = torch.linalg.eigh(H.double())
        lam = evals.flip(-1)[:, :k].to(torch.float32)
        U = Q @ X.flip(-1)[:, :, :k].to(torch.float32)
    else:
        raise ValueError(f"unknown method {method!r}")
    S = lam.clamp_min(0.0).sqrt()
    tiny = torch.finfo(torch.float32).tiny ** 0.5
    inv = torch.where(S > tiny * S[:, :1].clamp_min(1.0), 1.0 / S, torch.zeros_like(S))
    V = (W.transpose(1, 2) @ U) * inv[:, None, :]
    if transposed:
        U, V = V, U
    U, V = _canonical_signs(U, V)
    return U.contiguous(), S.contiguous(), V.contiguous()


def top_k(
    weight: Tensor,
    k: int | None = None,
    *,
    device: torch.device | str | None = None,
    oversample: int | None = None,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
    method: Method = "auto",
) -> Basis:
    """Top-``k`` singular basis of a 2-D ``weight`` (``k=None``: :func:`default_k`).

    ``oversample`` defaults to k (sketch width 2k); results are deterministic for a fixed ``seed``.
    The returned basis lives on ``device`` (default: the weight's device).
    """
    if weight.ndim != 2:
        raise ValueError(f"top_k expects a 2-D weight, got shape {tuple(weight.shape)}")
    dev = _resolve_device(device, weight)
    kk = default_k(weight.shape) if k is None else int(k)
    if kk < 1:
        raise ValueError(f"k must be >= 1, got {kk}")
    W = weight.detach().to(device=dev, dtype=torch.float32)[None]
    U, S, V = _core(W, kk, oversample=oversample, power_iters=power_iters, seed=seed, method=method)
    return Basis(U[0], S[0], V[0])


def top_k_batched(
    weights: Sequence[Tensor],
    k: int | Callable[[tuple[int, int]], int] | None = None,
    device: torch.device | str | None = None,
    *,
    oversample: int | None = None,
    power_iters: int = DEFAULT_POWER_ITERS,
    seed: int = 0,
    method: Method = "auto",
    max_batch_elems: int = 64 * 2**20,
) -> list[Basis]:
    """``top_k`` for many weights: same-shaped weights are stacked and solved with batched
    matmul/QR/eigh on ``device`` (e.g. ``"cuda"``), ``max_batch_elems`` weight elements per batch.

    ``k`` is an int, a function of the weight's shape, or None for :func:`default_k`. Each result
    equals ``top_k(weight, k, ...)`` up to float rounding (same seed, same sketch per shape).
    """
    out: list[Basis | None] = [None] * len(weights)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        if w.ndim != 2:
            raise ValueError(f"weight {i} is not 2-D: {tuple(w.shape)}")
        groups[(int(w.shape[0]), int(w.shape[1]))].append(i)
    for shape, idxs in groups.items():
        if k is None:
            kk = default_k(shape)
        elif callable(k):
            kk = int(k(shape))
        else:
            kk = int(k)
        dev = _resolve_device(device, weights[idxs[0]])
        per = max(1, max_batch_elems // (shape[0] * shape[1]))
        for start in range(0, len(idxs), per):
            chunk = idxs[start : start + per]
            W = torch.stack(
                [weights[i].detach().to(device=dev, dtype=torch.float32) for i in chunk]
            )
            U, S, V = _core(
                W, kk, oversample=oversample, power_iters=power_iters, seed=seed, method=method
            )
            del W
            for j, i in enumerate(chunk):
                out[i] = Basis(U[j], S[j], V[j])
    return out  # type: ignore[return-value]
