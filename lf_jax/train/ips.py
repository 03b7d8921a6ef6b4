"""Inverse-propensity weights per (position, task) from random vs ranked sessions.

weight(p, t) = CTR_random(p, t) / CTR_ranked(p, t): random-order sessions show what a
member would do without the old ranker's exposure and ordering, so up-weighting ranked
impressions by this ratio removes the bias the old ranker put into the logs. Both CTRs
are smoothed towards their session type's overall CTR, the ratio is clipped, and the
weights are normalised to mean 1 over ranked impressions. Random-session impressions
keep weight 1.

Example:
    >>> ips = compute_ips_weights(position_n, random_n, labels_nt, num_positions=20,
    ...                           tasks=("like", "comment", "share", "long_dwell"))
    >>> weights_bt = ips.batch_weights(position_b, random_b)
    >>> ips.save(workdir / "ips_weights.json")
"""

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lf_jax.errors import UserInputError

# the arrays of an IpsWeights, in constructor order after ``tasks`` (also the JSON keys)
_ARRAY_FIELDS = ("weights_pt", "ctr_random_pt", "ctr_ranked_pt", "count_random_p", "count_ranked_p")


@dataclasses.dataclass(frozen=True)
class IpsWeights:
    tasks: tuple[str, ...]
    weights_pt: np.ndarray
    ctr_random_pt: np.ndarray
    ctr_ranked_pt: np.ndarray
    count_random_p: np.ndarray
    count_ranked_p: np.ndarray
    clip: tuple[float, float]

    def batch_weights(self, position_b: np.ndarray, random_b: np.ndarray) -> np.ndarray:
        """[B, T] float32 weights: the table's row for ranked impressions, 1 for random ones."""
        position_b = np.asarray(position_b)
        if position_b.size and (position_b.min() < 0 or position_b.max() >= len(self.weights_pt)):
            raise UserInputError(
                f"ips: position {int(position_b.max())} outside the table's "
                f"{len(self.weights_pt)} positions"
            )
        rows = self.weights_pt[position_b]
        return np.where(np.asarray(random_b, bool)[:, None], 1.0, rows).astype(np.float32)

    def save(self, path: str | Path) -> None:
        """Writes JSON atomically (temp file + rename)."""
        path = Path(path)
        payload = {
            "tasks": list(self.tasks),
            "clip": list(self.clip),
            **{name: getattr(self, name).tolist() for name in _ARRAY_FIELDS},
        }
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            tmp.write_text(json.dumps(payload, indent=1))
            os.replace(tmp, path)
        except OSError as error:
            raise UserInputError(
                f"ips weights path '{path}' is not writable: {error.strerror}"
            ) from None

    @classmethod
    def load(cls, path: str | Path) -> "IpsWeights":
        path = Path(path)
        if not path.is_file():
            raise UserInputError(
                f"ips weights file '{path}' does not exist; run `lf-jax ips` first"
            )
        try:
            data = json.loads(path.read_text())
            return cls(
                tuple(data["tasks"]),
                *(np.asarray(data[name], np.float64) for name in _ARRAY_FIELDS),
                clip=tuple(data["clip"]),
            )
        except (KeyError, ValueError, TypeError) as error:
            raise UserInputError(f"ips weights file '{path}' is malformed: {error}") from None

    def format_table(self) -> str:
        """Readable per-position table of weights (and the CTRs behind them)."""
        head = "pos  n_random  n_ranked  " + "  ".join(f"{t:>10}" for t in self.tasks)
        lines = [head]
        for p in range(len(self.weights_pt)):
            lines.append(
                f"{p:>3}  {int(self.count_random_p[p]):>8}  {int(self.count_ranked_p[p]):>8}  "
                + "  ".join(f"{w:>10.3f}" for w in self.weights_pt[p])
            )
        return "\n".join(lines)


def _power_law_ctr(count_p: np.ndarray, clicks_pt: np.ndarray, iterations: int = 25) -> np.ndarray:
    """Poisson-regression fit CTR_t(p) = exp(a_t + b_t * log(1 + p)) -> [T, 2] (a, b).

    Fitted on per-position impression counts and clicks (sufficient statistics), two
    parameters per task, so a few hundred random-session impressions per position give a
    stable curve where per-position CTRs are mostly noise.
    """
    x_p = np.log1p(np.arange(len(count_p), dtype=np.float64))
    design_p2 = np.stack([np.ones_like(x_p), x_p], axis=1)
    params = []
    for t in range(clicks_pt.shape[1]):
        beta = np.array([np.log(max(clicks_pt[:, t].sum() / max(count_p.sum(), 1), 1e-6)), 0.0])
        for _ in range(iterations):  # Newton steps on the Poisson likelihood
            expected_p = count_p * np.exp(design_p2 @ beta)
            gradient = design_p2.T @ (clicks_pt[:, t] - expected_p)
            hessian = design_p2.T @ (design_p2 * expected_p[:, None]) + 1e-9 * np.eye(2)
            beta = beta + np.linalg.solve(hessian, gradient)
        params.append(beta)
    return np.asarray(params)


def position_counts(
    position_n: np.ndarray, random_n: np.ndarray, labels_nt: np.ndarray, num_positions: int
) -> dict[str, np.ndarray]:
    """Sufficient statistics of the weights: impressions [P] and clicks [P, T] per session type."""
    position_n, random_n = np.asarray(position_n), np.asarray(random_n, bool)
    labels_nt = np.asarray(labels_nt, np.float64)
    out = {}
    for kind, mask in (("random", random_n), ("ranked", ~random_n)):
        out[f"count_{kind}_p"] = np.bincount(position_n[mask], minlength=num_positions)[
            :num_positions
        ]
        out[f"clicks_{kind}_pt"] = np.stack(
            [
                np.bincount(position_n[mask], weights=labels_nt[mask, t], minlength=num_positions)[
                    :num_positions
                ]
                for t in range(labels_nt.shape[1])
            ],
            axis=1,
        ).reshape(num_positions, labels_nt.shape[1])
    return out


def compute_ips_weights(
    position_n: np.ndarray,
    random_n: np.ndarray,
    labels_nt: np.ndarray,
    *,
    num_positions: int,
    tasks: Sequence[str],
    clip: tuple[float, float] = (0.2, 5.0),
    smoothing: float = 50.0,
    fit: str = "power_law",
) -> IpsWeights:
    """Per-position, per-task weights from logged impressions (see module docstring)."""
    labels_nt = np.asarray(labels_nt, np.float64)
    if labels_nt.ndim != 2 or labels_nt.shape[1] != len(tasks):
        raise UserInputError(
            f"ips: labels have shape {labels_nt.shape}, expected [N, {len(tasks)}]"
        )
    return ips_weights_from_counts(
        **position_counts(position_n, random_n, labels_nt, num_positions),
        tasks=tasks,
        clip=clip,
        smoothing=smoothing,
        fit=fit,
    )


def ips_weights_from_counts(
    *,
    count_random_p,
    clicks_random_pt,
    count_ranked_p,
    clicks_ranked_pt,
    tasks: Sequence[str],
    clip: tuple[float, float] = (0.2, 5.0),
    smoothing: float = 50.0,
    fit: str = "power_law",
) -> IpsWeights:
    """The weights from per-position impressions [P] and clicks [P, T] of each session type.

    ``fit="power_law"`` (default) fits CTR(p) = c * (1 + p) ** -k per session type and task
    (Poisson regression) and takes the ratio of the two curves: smooth in p and stable with
    few random sessions. ``fit="per_position"`` uses each position's own CTRs, smoothed by
    ``smoothing`` pseudo-impressions at the session type's overall CTR.
    """
    counts = {
        "random": np.asarray(count_random_p, np.float64),
        "ranked": np.asarray(count_ranked_p, np.float64),
    }
    clicks = {
        "random": np.asarray(clicks_random_pt, np.float64),
        "ranked": np.asarray(clicks_ranked_pt, np.float64),
    }
    if clicks["random"].ndim != 2 or clicks["random"].shape[1] != len(tasks):
        raise UserInputError(
            f"ips: clicks have shape {clicks['random'].shape}, expected [P, {len(tasks)}]"
        )
    if not counts["random"].sum() or not counts["ranked"].sum():
        share = counts["random"].sum() / max(counts["random"].sum() + counts["ranked"].sum(), 1)
        raise UserInputError(
            "ips: the data needs both random-session and ranked-session impressions "
            f"(random share {share:.3f})"
        )
    if not 0 < clip[0] <= 1 <= clip[1]:
        raise UserInputError(f"ips: clip must satisfy 0 < low <= 1 <= high, got {clip}")
    if fit not in ("power_law", "per_position"):
        raise UserInputError(f"ips: fit must be 'power_law' or 'per_position', got {fit!r}")
    ctr = {
        kind: (clicks[kind] + smoothing * clicks[kind].sum(0) / counts[kind].sum())
        / (counts[kind][:, None] + smoothing)
        for kind in counts
    }
    if fit == "power_law":
        x_p1 = np.log1p(np.arange(len(counts["random"]), dtype=np.float64))[:, None]
        (a_random, b_random), (a_ranked, b_ranked) = (
            _power_law_ctr(counts[kind], clicks[kind]).T for kind in ("random", "ranked")
        )
        ratio_pt = np.exp((a_random - a_ranked)[None, :] + (b_random - b_ranked)[None, :] * x_p1)
    else:
        ratio_pt = ctr["random"] / np.maximum(ctr["ranked"], 1e-9)
    raw_pt = np.clip(ratio_pt, *clip)
    share_p = counts["ranked"] / counts["ranked"].sum()
    weights_pt = raw_pt / np.maximum((share_p[:, None] * raw_pt).sum(axis=0, keepdims=True), 1e-12)
    return IpsWeights(
        tuple(tasks),
        weights_pt,
        ctr["random"],
        ctr["ranked"],
        counts["random"],
        counts["ranked"],
        tuple(clip),
    )
