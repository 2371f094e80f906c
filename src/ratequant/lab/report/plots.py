"""PNG figures: bit-allocation heatmaps and measured distortion against fitted curves (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ratequant.errors import RateQuantError
from ratequant.geometry import KINDS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MAX_HEATMAP = (1024, 256)
"""The largest (layers, kv heads) a heatmap draws: beyond it the figure would not fit in memory or on a screen."""
FIGURE_FORMATS = ("png", "pdf", "svg")


def check_figure_path(path: str | Path) -> Path:
    """``path`` when its extension names a figure format ratequant writes (png, pdf, svg)."""
    path = Path(path)
    if path.suffix.lstrip(".").lower() not in FIGURE_FORMATS:
        raise RateQuantError(f"{path}: a figure must end in {', '.join('.' + f for f in FIGURE_FORMATS)}")
    return path


def bits_heatmap(bits: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Heatmap of widths ``bits [2, L, H]``: one panel per kind, layers down, kv heads across."""
    bits = np.asarray(bits)
    layers, heads = bits.shape[1], bits.shape[2]
    if layers > MAX_HEATMAP[0] or heads > MAX_HEATMAP[1]:
        raise RateQuantError(
            f"a heatmap of {layers} layers x {heads} kv heads is too large to draw (at most {MAX_HEATMAP[0]} layers "
            f"x {MAX_HEATMAP[1]} kv heads); read the widths from the plan file instead"
        )
    plt = _pyplot()
    lo, hi = int(bits.min()), int(bits.max())
    width = min(30.0, max(8.0, 3.0 + 1.0 * heads * 2))  # inches; capped so the figure stays drawable
    fig, axes = plt.subplots(1, 2, figsize=(width, min(30.0, 1.5 + 0.18 * layers)), squeeze=False)
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
        fig.suptitle(plain_title(title))
    return _save(fig, path)


def distortion_curves(
    measured: np.ndarray,
    alpha: np.ndarray,
    betas: tuple[float, float],
    bitset,
    path: str | Path,
    title: str = "",
    max_lines: int = 24,
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
        fig.suptitle(plain_title(title))
    return _save(fig, path)


def plain_title(text: str) -> str:
    """``text`` drawn as it is: one line (:func:`~ratequant.validation.inert`), with ``$`` escaped so that a name
    holding dollar signs is not read as matplotlib mathtext (which refuses what it cannot parse)."""
    from ratequant.validation import inert

    return inert(text).replace("$", r"\$")


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` atomically (temporary file beside ``path``, then rename); the figure is always closed."""
    import os
    import tempfile

    from ratequant.jsonio import publish

    path = check_figure_path(path)
    try:
        if path.is_dir():
            raise RateQuantError(f"{path} is a directory; pass a file path for the figure")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".").lower())
            publish(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise RateQuantError(f"cannot write the figure {path}: {exc.strerror or exc}") from None
    finally:
        _pyplot().close(fig)
    return path


def method_panels(
    panels: dict[str, dict[str, tuple[list[float], list[float]]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str = "perplexity",
    reference: float | None = None,
    reference_label: str = "full precision",
    logy: bool = True,
    title: str = "",
    dashed: tuple[str, ...] = (),
) -> Path:
    """One panel per entry of ``panels``, each a set of named series ``{label: (xs, ys)}`` drawn as points
    joined by lines; a series keeps its colour and marker in every panel. Series named in ``dashed`` are
    drawn dashed with open markers (baselines that other series may overlap). ``reference`` draws a dashed
    black horizontal line (e.g. the full-precision perplexity)."""
    plt = _pyplot()
    labels: list[str] = []
    for series in panels.values():
        labels += [label for label in series if label not in labels]
    colors = dict(zip(labels, plt.cm.tab10(np.arange(len(labels)) % 10)))
    shapes = ["o", "s", "^", "D", "v", "P", "X"]  # 7 shapes against 10 colours: no two of 70 series look alike
    markers = {label: shapes[i % len(shapes)] for i, label in enumerate(labels)}
    n = max(1, len(panels))
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.6 * cols, 3.9 * rows), squeeze=False, sharey=True)
    for ax, (name, series) in zip(axes.flat, panels.items()):
        for label, (xs, ys) in series.items():
            order = np.argsort(np.asarray(xs, dtype=float), kind="stable")
            xs_sorted = np.asarray(xs, dtype=float)[order]
            ys_sorted = np.asarray(ys, dtype=float)[order]
            if label in dashed:
                ax.plot(
                    xs_sorted,
                    ys_sorted,
                    marker=markers[label],
                    ms=9,
                    lw=1.2,
                    ls="--",
                    color=colors[label],
                    markerfacecolor="none",
                    label=label,
                )
            else:
                ax.plot(xs_sorted, ys_sorted, marker=markers[label], ms=5, lw=1.2, color=colors[label], label=label)
        if reference is not None:
            ax.axhline(reference, color="k", ls="--", lw=0.9, label=reference_label)
        if logy:
            ax.set_yscale("log")
            _plain_log_ticks(ax)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.25)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    handles, names = [], []
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in names:
                handles.append(h)
                names.append(label)
    fig.legend(
        handles,
        names,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        ncol=min(4, len(names)),
        fontsize=8,
        frameon=False,
    )
    if title:
        fig.suptitle(plain_title(title))
    fig.tight_layout()
    return _save(fig, path)


def _plain_log_ticks(ax) -> None:
    """Log-scale y ticks written as plain numbers; minor ticks labelled too when the range is under 20x."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    plain = FuncFormatter(lambda v, _: f"{v:.4g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if lo > 0 and hi / lo < 20 else NullFormatter())
    ax.tick_params(axis="y", which="minor", labelsize=7)


def bits_heatmap_grid(rows: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Widths ``bits [2, L, H]`` of several allocations on one colour scale: a row per entry (labelled with
    its mean key and value widths), a column per kind; layers across, kv heads down."""
    plt = _pyplot()
    arrays = [np.asarray(b) for b in rows.values()]
    lo = min(int(b.min()) for b in arrays)
    hi = max(int(b.max()) for b in arrays)
    num_layers, num_heads = arrays[0].shape[1], arrays[0].shape[2]
    width = min(18.0, max(9.0, 3.0 + 0.25 * num_layers * 2))
    height = min(40.0, 1.0 + len(rows) * (0.45 + 0.22 * num_heads))
    fig, axes = plt.subplots(
        len(rows), 2, figsize=(width, height), squeeze=False, sharex=True, sharey=True, constrained_layout=True
    )
    image = None
    step = max(1, int(np.ceil(num_layers / 15)))
    for r, (name, bits) in enumerate(zip(rows, arrays)):
        for k, ax in enumerate(axes[r]):
            image = ax.imshow(
                bits[k].T, aspect="auto", cmap="viridis", vmin=lo - 0.5, vmax=hi + 0.5, interpolation="nearest"
            )
            ax.set_yticks(range(num_heads))
            ax.set_xticks(range(0, num_layers, step))
            ax.tick_params(labelsize=7)
            if r == 0:
                ax.set_title(f"{KINDS[k]}s", fontsize=10)
            if num_layers * num_heads <= 160:
                for (layer, head), b in np.ndenumerate(bits[k]):
                    ax.text(layer, head, str(b), ha="center", va="center", fontsize=6, color="w")
        axes[r, 0].set_ylabel(
            f"{name}\nK {bits[0].mean():.2f}, V {bits[1].mean():.2f}", rotation=0, ha="right", va="center", fontsize=8
        )
    for ax in axes[-1]:
        ax.set_xlabel("layer")
    fig.colorbar(image, ax=axes.ravel().tolist(), ticks=range(lo, hi + 1), label="bits", fraction=0.03, pad=0.01)
    if title:
        fig.suptitle(plain_title(title + " (kv heads down, layers across)"), fontsize=10)
    return _save(fig, path)
