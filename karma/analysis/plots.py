"""PNG figures of the attention analysis; one column per checkpoint, so two runs sit side by side.

    plot_history_heatmaps([("karma", {0: m0, 14: m14, 29: m29})], "heatmaps.png")
    plot_sink_maps([("karma", first_scores, history_scores)], eps=0.3, path="sink_maps.png")
    plot_layer_curves([("karma", {"sink rate (first)": r, "mass to first": m})], "layers.png")

Inputs are numpy arrays: heatmaps are users x history slots of `<EMB>`'s attention (averaged over
heads, renormalized over the history so rows are comparable), sink maps are layer x head mean
attention to the key. matplotlib is imported inside the functions and uses the Agg backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history_heatmaps(
    panels: Sequence[tuple[str, dict[int, np.ndarray]]], path: str | Path
) -> Path:
    """Users x history-slot heatmaps: one row per layer, one column per checkpoint.

    panels: (label, {layer: (U, n) array}) per checkpoint, the same layers in each. Vertical
    strips ("barcodes") mean every user's `<EMB>` attends the same slot.
    """
    plt = _pyplot()
    layers = list(panels[0][1])
    size = (max(6.5, 4.5 * len(panels)), 3.2 * len(layers))
    fig, axes = plt.subplots(len(layers), len(panels), figsize=size, squeeze=False)
    for col, (label, maps) in enumerate(panels):
        for row, layer in enumerate(layers):
            ax = axes[row][col]
            image = ax.imshow(
                maps[layer], aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest"
            )
            ax.set_title(f"{label}: layer {layer}", fontsize=9)
            ax.set_xlabel("history slot (oldest -> newest)", fontsize=8)
            ax.set_ylabel("probe user", fontsize=8)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(
        "<EMB> attention over history slots\n(heads averaged, rows renormalized)", fontsize=10
    )
    fig.tight_layout()
    return _save(fig, path)


def plot_sink_maps(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]], eps: float, path: str | Path
) -> Path:
    """Layer x head mean attention to the first token (top row) and to the most-attended history
    slot (bottom row), one column per checkpoint; cells above eps (sinks) are marked."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    size = (max(5.0, 4.0 * len(panels)), 7.0)
    fig, axes = plt.subplots(2, len(panels), figsize=size, squeeze=False)
    for col, (label, first, history) in enumerate(panels):
        for row, (name, scores) in enumerate(
            (("<EMB> -> first token", first), ("<EMB> -> top history slot", history))
        ):
            ax = axes[row][col]
            image = ax.imshow(
                scores, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest"
            )
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            layers, heads = np.nonzero(scores > eps)
            ax.scatter(heads, layers, marker="x", s=10, c="cyan", linewidths=0.8)
            ax.set_title(f"{label}: {name} (x = sink, > {eps:g})", fontsize=9)
            ax.set_xlabel("head", fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return _save(fig, path)


def plot_layer_curves(
    panels: Sequence[tuple[str, dict[str, np.ndarray]]], path: str | Path
) -> Path:
    """One subplot per metric (per-layer curves), one line per checkpoint."""
    plt = _pyplot()
    names = list(panels[0][1])
    fig, axes = plt.subplots(1, len(names), figsize=(4.0 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for label, curves in panels:
            values = np.asarray(curves[name])
            ax.plot(np.arange(len(values)), values, marker="o", markersize=3, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
