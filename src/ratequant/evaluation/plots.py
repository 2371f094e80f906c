"""PNG figures: bit-allocation heatmaps and measured distortion against fitted curves (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ratequant.geometry import KINDS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bits_heatmap(bits: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Heatmap of widths ``bits [2, L, H]``: one panel per kind, layers down, kv heads across."""
    plt = _pyplot()
    bits = np.asarray(bits)
    lo, hi = int(bits.min()), int(bits.max())
    width = max(8.0, 3.0 + 1.0 * bits.shape[2] * 2)
    fig, axes = plt.subplots(1, 2, figsize=(width, 1.5 + 0.18 * bits.shape[1]), squeeze=False)
    for k, ax in enumerate(axes[0]):
        image = ax.imshow(bits[k], aspect="auto", cmap="viridis", vmin=lo - 0.5, vmax=hi + 0.5, interpolation="nearest")
        ax.set_title(f"{KINDS[k]}s: mean {bits[k].mean():.2f} bits", fontsize=10)
        ax.set_xlabel("kv head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(bits.shape[2]))
        if bits.shape[1] * bits.shape[2] <= 200:
            for (layer, head), b in np.ndenumerate(bits[k]):
                ax.text(head, layer, str(b), ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(image, ax=axes[0].tolist(), ticks=range(lo, hi + 1), label="bits")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def distortion_curves(
    measured: np.ndarray, alpha: np.ndarray, betas: tuple[float, float], bitset, path: str | Path, title: str = "", max_lines: int = 24
) -> Path:
    """Measured distortion ``[2, L, H, nb]`` (points) with fitted ``alpha [2, L, H] * beta^-b`` (lines), log scale.

    At most ``max_lines`` components per kind are drawn, spread over the range of alpha.
    """
    plt = _pyplot()
    bits = np.asarray(bitset, dtype=float)
    grid = np.linspace(bits[0], bits[-1], 50)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for k, ax in enumerate(axes):
        flat_alpha = alpha[k].reshape(-1)
        flat_measured = measured[k].reshape(-1, len(bits))
        order = np.argsort(flat_alpha)
        chosen = order[np.unique(np.linspace(0, len(order) - 1, min(max_lines, len(order))).round().astype(int))]
        colors = plt.cm.plasma(np.linspace(0, 0.9, len(chosen)))
        for color, i in zip(colors, chosen):
            points = flat_measured[i]
            positive = points > 0
            ax.plot(bits[positive], points[positive], "o", ms=3, color=color)
            if flat_alpha[i] > 0:
                ax.plot(grid, flat_alpha[i] * betas[k] ** -grid, "-", lw=0.8, color=color)
        ax.set_yscale("log")
        ax.set_xlabel("bits")
        ax.set_title(f"{KINDS[k]}s: beta = {betas[k]:.2f}")
    axes[0].set_ylabel("distortion")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path
