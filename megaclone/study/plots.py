"""Figures for the "Scaling Smart" reproduction (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def symmetry(series: Mapping[str, Sequence[tuple[float, float]]], path: Path) -> Path:
    """Mean cosine similarity between clone blocks of every weight matrix, over training."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        tokens, cos = zip(*points)
        ax.plot(np.array(tokens) / 1e6, cos, marker="o", label=name,
                linestyle="--" if name == "random-init" else "-")
    ax.set_xlabel("training tokens of the wide model (millions)")
    ax.set_ylabel("cosine(clone block 0, clone block 1)")
    ax.set_ylim(-0.1, 1.05)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def spectra(values: Mapping[str, np.ndarray], title: str, path: Path) -> Path:
    """Singular values (descending) of one weight: the source's and each clone's at initialization."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, sv in values.items():
        style = dict(color="black", linestyle="--", linewidth=1.5, zorder=5) if name == "source" else {}
        ax.semilogy(np.arange(1, len(sv) + 1), np.maximum(sv, 1e-12), label=name, **style)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def loss_bands(bands: Mapping[str, Sequence[tuple[float, float, float, float]]], target: float, path: Path,
               title: str = "") -> Path:
    """Validation loss against tokens: per run the mean over seeds as a line and the range over seeds
    as a band. ``bands[name]`` holds (tokens, mean, low, high) points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    top = bottom = target
    for name, points in bands.items():
        tokens, mean, low, high = (np.array(v) for v in zip(*points))
        line, = ax.plot(tokens / 1e6, mean, label=name, linestyle="--" if name.startswith("random-init") else "-")
        if np.any(high > low):
            ax.fill_between(tokens / 1e6, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        top = max(top, float(np.median(mean)))  # a random-init start would flatten every other curve
        bottom = min(bottom, float(low.min()))
    ax.axhline(target, color="gray", linewidth=0.8, linestyle=":", label="target (random-init final loss)")
    ax.set_xlabel("training tokens of the wide model (millions)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_ylim(bottom * 0.98, top * 1.15)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def symmetry_groups(series: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: Path) -> Path:
    """The paper's Figure 5: mean per-row cosine between cloned halves, one panel per weight group
    (``series[group][run]`` holds (tokens, cosine) points)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 4), sharey=True)
    for ax, (group, runs) in zip(np.atleast_1d(axes), series.items()):
        for name, points in runs.items():
            tokens, cos = zip(*points)
            ax.plot(np.array(tokens) / 1e6, cos, marker=".", label=name,
                    linestyle="--" if name.startswith("random-init") else "-")
        ax.set_title(group)
        ax.set_xlabel("tokens (millions)")
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("mean row cosine, clone half 0 vs 1")
    np.atleast_1d(axes)[-1].legend(fontsize=7)
    return _save(fig, path)
