"""Ranking metrics on host arrays: AUC, normalised entropy, calibration.

Example:
    >>> auc(np.array([0.1, 0.9, 0.4]), np.array([0, 1, 1]))
    1.0
    >>> binary_metrics(probs_nt, labels_nt, tasks=("like", "share"))["like/auc"]
    >>> print(format_metrics({"holdout_random/like/auc": 0.87}))   # as lf-jax eval prints
"""

from collections.abc import Mapping, Sequence

import numpy as np


def auc(scores_n: np.ndarray, labels_n: np.ndarray) -> float:
    """Area under the ROC curve (ties share their average rank); NaN with one class."""
    scores_n, labels_n = np.asarray(scores_n, np.float64), np.asarray(labels_n) > 0.5
    positives = int(labels_n.sum())
    negatives = labels_n.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores_n, kind="mergesort")
    sorted_scores = scores_n[order]
    ranks = np.empty(scores_n.size, np.float64)
    starts = np.r_[0, np.nonzero(np.diff(sorted_scores))[0] + 1]
    ends = np.r_[starts[1:], scores_n.size]
    average = (starts + ends + 1) / 2.0  # 1-based average rank of each tie run
    ranks[order] = np.repeat(average, ends - starts)
    return float(
        (ranks[labels_n].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    )


def log_loss(probs_n: np.ndarray, labels_n: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs_n, np.float64), eps, 1 - eps)
    y = np.asarray(labels_n, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def normalized_entropy(probs_n: np.ndarray, labels_n: np.ndarray) -> float:
    """Log loss divided by the entropy of the base rate (< 1 beats predicting the mean)."""
    base = float(np.mean(labels_n))
    if base in (0.0, 1.0):
        return float("nan")
    return log_loss(probs_n, labels_n) / log_loss(np.full(len(labels_n), base), labels_n)


def calibration(probs_n: np.ndarray, labels_n: np.ndarray) -> float:
    """Sum of predicted probabilities over the number of positives (1 is calibrated)."""
    positives = float(np.sum(labels_n))
    return float(np.sum(probs_n) / positives) if positives else float("nan")


def binary_metrics(
    probs_nt: np.ndarray,
    labels_nt: np.ndarray,
    tasks: Sequence[str],
    oracle_probs_nt: np.ndarray | None = None,
) -> dict[str, float]:
    """Per task: auc, ne, calibration, and oracle_auc when true probabilities are given."""
    out = {}
    for index, task in enumerate(tasks):
        p, y = probs_nt[:, index], labels_nt[:, index]
        out[f"{task}/auc"] = auc(p, y)
        out[f"{task}/ne"] = normalized_entropy(p, y)
        out[f"{task}/calibration"] = calibration(p, y)
        if oracle_probs_nt is not None:
            out[f"{task}/oracle_auc"] = auc(oracle_probs_nt[:, index], y)
    return out


def format_metrics(metrics: Mapping[str, float]) -> str:
    """Splits 'split/task/metric' keys into one row per split and task; the counters of
    dynamic tables ('dynamic/<table>/<counter>') follow in a table of their own."""
    blocks = []
    for dynamic in (False, True):
        part = {k: v for k, v in metrics.items() if k.startswith("dynamic/") == dynamic}
        if not part:
            continue
        rows: dict[tuple[str, str], dict[str, float]] = {}
        for key, value in sorted(part.items()):
            split, task, name = key.split("/") if key.count("/") == 2 else ("", *key.split("/", 1))
            rows.setdefault((split, task), {})[name] = value
        names = sorted({name for row in rows.values() for name in row})
        widths = {n: max(12, len(n) + 1) for n in names}
        head = ("split", "task") if not dynamic else ("dynamic", "table")
        lines = [f"{head[0]:<16}{head[1]:<12}" + "".join(f"{n:>{widths[n]}}" for n in names)]
        for (split, task), row in rows.items():
            cells = (f"{row.get(n, float('nan')):>{widths[n]}.4f}" for n in names)
            lines.append(f"{split:<16}{task:<12}" + "".join(cells))
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
