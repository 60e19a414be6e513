"""Machine-readable metrics: one JSON object per line, plus a loss plot redrawn on each append."""

from __future__ import annotations

import json
from pathlib import Path

from fedgpt.files import atomic_write, atomic_write_bytes


class MetricsLog:
    """Append-only JSONL log keyed by `x` ("step" or "round"), with an optional PNG of the val loss."""

    def __init__(self, path: str | Path, plot: str | Path | None = None, x: str = "step"):
        self.path, self.plot_path, self.x = Path(path), Path(plot) if plot else None, x
        self.rows = read_jsonl(self.path)

    def truncate(self, last_x: int) -> None:
        """Keep only rows with x <= last_x (a resumed run redoes what came after its checkpoint)."""
        self.rows = [r for r in self.rows if r[self.x] <= last_x]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.rows).encode())

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        # From the second row on: one point is no curve, and the first plot (which imports matplotlib) would
        # otherwise sit between a federation's round-0 evaluation and round 1.
        if self.plot_path and len(self.rows) > 1:
            plot_losses(self.rows, self.plot_path, self.x)


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(rows: list[dict], path: Path, x: str = "step") -> None:
    """Validation (and train) loss against x and against tokens, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key in zip(axes, (x, "tokens")):
        for name in ("train_loss", "val_loss"):
            pts = [(r[key], r[name]) for r in rows if r.get(name) is not None and r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=name.replace("_", " "))
        ax.set_xlabel(key)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
