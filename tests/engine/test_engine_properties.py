"""Behaviour of each method on controlled base-model pairs (the table in docs/methods.md).

Run ``python tests/engine/test_engine_properties.py`` to print the table.

Source weight: 256×192, power-law spectrum (σ_i = i^-0.5) plus a noise bulk at σ_k, k = 48
(a quarter of the smaller side, as :func:`default_k`), rank-8 LoRAs:
  * ``generic``: random B, A (like most of a trained LoRA, mostly outside the top-k subspaces),
  * ``in-top-k``: B = U_s X, A = Y V_sᵀ (a LoRA-X-style adapter living in the source's top-k).
Targets: identical; W_s + ε·E with ‖εE‖_F = 5% / 20% of ‖W_s‖_F (ideal port: ΔW_s);
output space rotated, W_t = Q W_s with Q random orthogonal (ideal port: Q ΔW_s).
Entries: relative error ‖ΔW_port − ΔW_ideal‖_F / ‖ΔW_ideal‖_F at the LoRA's rank.
"""

from __future__ import annotations

import functools

import torch

from lorareg.engine import get_method, relative_error, top_k

M, N, K, R = 256, 192, 48, 8
METHOD_ROWS = ["copy", "lora-x", "prolora", "prolora-full", "align", "align (no sign fix)"]


def _orth(n, k, g):
    return torch.linalg.qr(torch.randn(n, k, generator=g))[0]


@functools.lru_cache(maxsize=1)
def property_table() -> dict[tuple[str, str, str], float]:
    g = torch.Generator().manual_seed(1234)
    r = min(M, N)
    s = torch.arange(1, r + 1, dtype=torch.float32) ** -0.5
    Ws = (_orth(M, r, g) * s) @ _orth(N, r, g).T
    Ws = Ws + 0.5 * s[K - 1] * torch.randn(M, N, generator=g) / (M**0.5 + N**0.5)
    src = top_k(Ws, K)
    loras = {
        "generic": (torch.randn(M, R, generator=g), torch.randn(R, N, generator=g)),
        "in-top-k": (
            src.U @ torch.randn(K, R, generator=g),
            torch.randn(R, K, generator=g) @ src.V.T,
        ),
    }
    E = torch.randn(M, N, generator=g)
    Q = _orth(M, M, g)
    targets = {
        "identical": (Ws, None),
        "perturbed 5%": (Ws + 0.05 * Ws.norm() / E.norm() * E, None),
        "perturbed 20%": (Ws + 0.20 * Ws.norm() / E.norm() * E, None),
        "rotated output": (Q @ Ws, Q),
    }
    table = {}
    for tname, (Wt, rot) in targets.items():
        tgt = top_k(Wt, K)
        for lname, (B, A) in loras.items():
            ideal_up = B if rot is None else rot @ B
            for row in METHOD_ROWS:
                if row == "align (no sign fix)":
                    out = get_method("align")(B, A, source=src, target=tgt, rank=R, fix_signs=False)
                else:
                    out = get_method(row)(B, A, source=src, target=tgt, rank=R)
                table[(tname, lname, row)] = relative_error(out.up, out.down, ideal_up, A)
        table[(tname, "similarity", "")] = get_method("lora-x")(
            *loras["generic"], source=src, target=tgt, rank=R
        ).similarity
    return table


def test_identical_target_properties():
    t = property_table()
    for lora in ("generic", "in-top-k"):
        assert t[("identical", lora, "copy")] < 1e-5
        assert t[("identical", lora, "prolora-full")] < 1e-4
    assert t[("identical", "generic", "lora-x")] > 0.5  # drops what is outside the top-k
    assert t[("identical", "in-top-k", "lora-x")] < 1e-4  # ...which is nothing for LoRA-X adapters


def test_perturbed_target_ordering():
    t = property_table()
    for p in ("perturbed 5%", "perturbed 20%"):
        for lora in ("generic", "in-top-k"):
            full = t[(p, lora, "prolora-full")]
            assert full <= t[(p, lora, "prolora")] + 1e-6
            assert full <= t[(p, lora, "lora-x")] + 1e-6


def test_rotated_output_needs_alignment_and_signs():
    t = property_table()
    for lora in ("generic", "in-top-k"):
        assert t[("rotated output", lora, "copy")] > 1.0  # ‖QΔW − ΔW‖ ≈ √2‖ΔW‖
        assert t[("rotated output", lora, "align")] < t[("rotated output", lora, "copy")]
    assert t[("rotated output", "in-top-k", "align")] < 1e-3  # rotation recovered exactly
    assert t[("rotated output", "in-top-k", "align (no sign fix)")] > 0.5


def markdown() -> str:
    t = property_table()
    targets = ["identical", "perturbed 5%", "perturbed 20%", "rotated output"]
    head = "| method | " + " | ".join(f"{x} / {l}" for x in targets for l in ("generic", "in-top-k")) + " |"
    lines = [head, "|---" * (1 + 2 * len(targets)) + "|"]
    for row in METHOD_ROWS:
        vals = [f"{t[(x, l, row)]:.3f}" for x in targets for l in ("generic", "in-top-k")]
        lines.append(f"| {row} | " + " | ".join(vals) + " |")
    sims = [f"{t[(x, 'similarity', '')]:.3f}" for x in targets for _ in (0, 1)]
    lines.append("| *subspace similarity (min of both sides)* | " + " | ".join(sims) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
