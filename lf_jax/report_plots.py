"""PNG plots for run reports: loss curves from history.jsonl, recall by Matryoshka dimension.

matplotlib with the Agg backend (no display needed); each function writes one file and
returns its path.

Example:
    >>> loss_curves_png({"ranker": "runs/demo/ranker/history.jsonl"}, "runs/demo/loss_curves.png")
    >>> recall_by_dim_png({16: 0.21, 32: 0.25, 64: 0.27}, "runs/demo/recall_by_dim.png",
    ...                   baseline=("popularity", 0.05))
"""

import json
from collections.abc import Mapping
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_losses(history: str | Path) -> tuple[list[int], list[float]]:
    """(steps, train losses) from a trainer's history.jsonl (rows with a "loss" key)."""
    steps, losses = [], []
    for line in Path(history).read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    return steps, losses


def loss_curves_png(histories: Mapping[str, str | Path], path: str | Path) -> Path:
    """One panel per run: its training loss against the step."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.5), squeeze=False)
    for ax, (name, history) in zip(axes[0], histories.items(), strict=False):
        steps, losses = read_losses(history)
        ax.plot(steps, losses, marker="o", markersize=3)
        ax.set_title(f"{name}: training loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def recall_by_dim_png(
    recall_by_dim: Mapping[int, float],
    path: str | Path,
    *,
    k: int = 10,
    baseline: tuple[str, float] | None = None,
    title: str = "dual encoder",
) -> Path:
    """recall@k against the Matryoshka prefix dimension, with an optional baseline line."""
    plt = _pyplot()
    dims = sorted(recall_by_dim)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(dims, [recall_by_dim[d] for d in dims], marker="o", label="embedding prefix")
    if baseline is not None:
        ax.axhline(baseline[1], color="gray", linestyle="--", label=baseline[0])
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(d) for d in dims])
    top = max([*recall_by_dim.values(), baseline[1] if baseline else 0.0])
    ax.set_ylim(0.0, max(top * 1.15, 1e-3))  # from 0: differences read at their size
    ax.set_xlabel("Matryoshka dimension")
    ax.set_ylabel(f"recall@{k} (held-out pairs)")
    ax.set_title(f"{title}: recall@{k} by dimension")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
