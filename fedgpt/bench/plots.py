"""What the results tables' figures share: a matplotlib figure without a display, written atomically, and
linked below its table."""

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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100, metadata={"Software": None}))
    plt.close(fig)


def loss_against_bytes(ax, xlabel: str) -> None:
    """The axes of a frontier: megabytes on a log scale, the final val loss up."""
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("final central val loss")


def with_figure(table: str, plot, res: list[dict], doc: Path, name: str, alt: str) -> str:
    """`table` with its figure, plot(res) written to results/<name> beside `doc`, linked below it."""
    png = doc.parent / "results" / name
    plot(res, png)
    return f"{table}\n\n![{alt}]({png.relative_to(doc.parent)})"
