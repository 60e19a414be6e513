"""The figure set-up the results tables share: a matplotlib figure without a display, written atomically."""

from __future__ import annotations

from pathlib import Path

from fedgpt.files import atomic_write


def axes(figsize: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    return plt, fig, ax


def save(plt, fig, ax, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ax.grid(alpha=0.3)
    ax.legend(
        fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1)
    )  # beside the axes: inside, it hides curves
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
