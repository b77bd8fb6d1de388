"""Plots of the fidelity benchmark (matplotlib, PNG, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from run import FLAG_THRESHOLD, pairs  # noqa: E402


def make_all(results: dict, samples, out: Path) -> list[Path]:
    made = [gain_bars(results, out / "gain_recovered.png"), threshold_curves(results, out / "loss_vs_threshold.png"),
            similarity_per_layer(results, out / "layer_similarity.png")]
    if samples:
        made.append(digit_grid(samples, out / "digits_grid.png"))
    return made


def gain_bars(results: dict, path: Path) -> Path:
    rows = list(pairs(results))
    methods = list(dict.fromkeys(m for _, _, p in rows for m in p["methods"]))
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(rows)), 4.2))
    width = 0.8 / max(1, len(methods))
    for j, m in enumerate(methods):
        xs, ys = [], []
        for i, (_, _, p) in enumerate(rows):
            if m in p["methods"] and not math.isnan(p["methods"][m]["gain"]):
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(100 * p["methods"][m]["gain"])
        ax.bar(xs, ys, width, label=m)
    ax.axhline(100, color="k", lw=0.8, ls=":")
    ax.axhline(90, color="g", lw=0.8, ls="--")
    ax.axhline(70, color="orange", lw=0.8, ls="--")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(rows)), [f"{label}\n({p['kind']})" for label, _, p in rows], fontsize=8)
    ax.set_ylabel("gain recovered (%)  [100% = retrained on target]")
    ax.set_ylim(min(-20, ax.get_ylim()[0]), 115)
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("LoRA ported training-free vs retrained on the target")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def threshold_curves(results: dict, path: Path) -> Path:
    rows = list(pairs(results))
    fig, axes = plt.subplots(1, len(rows), figsize=(3.6 * len(rows), 3.4), squeeze=False)
    for ax, (label, _, p) in zip(axes[0], rows):
        for m, sweep in p["threshold_sweep"].items():
            ax.plot([s["threshold"] for s in sweep], [s["loss"] for s in sweep], marker="o", ms=3, label=m)
        ax.axhline(p["loss_none"], color="k", ls=":", lw=1, label="no adapter")
        ax.axhline(p["loss_retrained"], color="g", ls="--", lw=1, label="retrained")
        ax.axvline(FLAG_THRESHOLD, color="r", lw=0.6, alpha=0.5)
        ax.set_title(f"{label}\n{p['kind']}", fontsize=8)
        ax.set_xlabel("similarity threshold")
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("held-out task loss")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def similarity_per_layer(results: dict, path: Path) -> Path:
    rows = list(pairs(results))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, _, p in rows:
        sims = sorted(p["layer_similarity"].values())
        if sims:
            ax.plot([i / max(1, len(sims) - 1) for i in range(len(sims))], sims, label=f"{label} ({len(sims)} layers)")
    ax.axhline(FLAG_THRESHOLD, color="r", lw=0.8, ls="--", label=f"flag threshold {FLAG_THRESHOLD}")
    ax.set_xlabel("layers, sorted (fraction)")
    ax.set_ylabel("subspace similarity (k = dim/4)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def digit_grid(samples: dict, path: Path) -> Path:
    names = list(samples)
    fig, axes = plt.subplots(len(names), 10, figsize=(7.5, 0.85 * len(names) + 0.4), squeeze=False)
    for r, name in enumerate(names):
        for c in range(10):
            ax = axes[r][c]
            ax.imshow(samples[name][c], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
            if r == 0:
                ax.set_title(str(c), fontsize=8)
    fig.suptitle("DDIM samples per class; task LoRA = inverted digits", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
