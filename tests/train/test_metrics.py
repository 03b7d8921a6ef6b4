import numpy as np
import pytest

from lf_jax.train.metrics import auc, binary_metrics, calibration, normalized_entropy


def _pairwise_auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return greater / (len(pos) * len(neg))


def test_auc_matches_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(500), 2)  # many ties
    labels = (rng.random(500) < scores).astype(int)
    assert auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-12)


def test_auc_extremes():
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert np.isnan(auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_normalized_entropy_and_calibration():
    labels = np.array([0, 0, 0, 1] * 25)
    assert normalized_entropy(np.full(100, 0.25), labels) == pytest.approx(1.0)
    assert normalized_entropy(np.where(labels == 1, 0.9, 0.05), labels) < 0.5
    assert calibration(np.full(100, 0.5), labels) == pytest.approx(2.0)


def test_binary_metrics_names():
    probs = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.6], [0.7, 0.1]])
    labels = np.array([[0, 1], [1, 0], [0, 1], [1, 0]])
    out = binary_metrics(probs, labels, ("like", "share"), oracle_probs_nt=probs)
    assert out["like/auc"] == 1.0 and out["share/oracle_auc"] == 1.0
    assert set(out) == {
        f"{t}/{m}" for t in ("like", "share") for m in ("auc", "ne", "calibration", "oracle_auc")
    }


def test_format_metrics_prints_dynamic_counters_in_a_table_of_their_own():
    from lf_jax.train.metrics import format_metrics

    text = format_metrics(
        {
            "holdout_random/like/auc": 0.87,
            "holdout_random/like/ne": 0.75,
            "dynamic/post/occupancy_max": 0.96,
            "dynamic/post/not_admitted": 3.0,
        }
    )
    lines = text.splitlines()
    assert lines[0].split() == ["split", "task", "auc", "ne"]
    assert lines[1].split() == ["holdout_random", "like", "0.8700", "0.7500"]
    assert lines[2].split() == ["dynamic", "table", "not_admitted", "occupancy_max"]
    assert lines[3].split() == ["dynamic", "post", "3.0000", "0.9600"]
