import numpy as np
import pytest

from lf_jax.errors import UserInputError
from lf_jax.train.ips import IpsWeights, compute_ips_weights


def _logs(n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    position = rng.integers(0, 5, n)
    random = rng.random(n) < 0.2
    # ranked sessions over-expose: CTR 0.2 at every position; random sessions 0.1 / (1 + pos)
    p = np.where(random, 0.1 / (1 + position), 0.2)
    labels = (rng.random((n, 2)) < p[:, None]).astype(np.float32)
    return position, random, labels


def test_weights_follow_the_ctr_ratio_and_are_normalised():
    position, random, labels = _logs()
    ips = compute_ips_weights(
        position,
        random,
        labels,
        num_positions=5,
        tasks=("a", "b"),
        clip=(0.01, 100.0),
        smoothing=0.0,
    )
    expected_ratio = (0.1 / (1 + np.arange(5))) / 0.2
    ratio = ips.weights_pt[:, 0] / ips.weights_pt[0, 0]
    np.testing.assert_allclose(ratio, expected_ratio / expected_ratio[0], rtol=0.1)
    share = ips.count_ranked_p / ips.count_ranked_p.sum()
    np.testing.assert_allclose((share[:, None] * ips.weights_pt).sum(0), 1.0, rtol=1e-9)


def test_clipping_and_batch_weights():
    position, random, labels = _logs()
    ips = compute_ips_weights(
        position, random, labels, num_positions=5, tasks=("a", "b"), clip=(0.2, 2.0)
    )
    weights = ips.batch_weights(np.array([0, 4, 4]), np.array([False, False, True]))
    assert weights.shape == (3, 2) and weights.dtype == np.float32
    np.testing.assert_array_equal(weights[2], [1.0, 1.0])
    assert weights[0, 0] > weights[1, 0]
    with pytest.raises(UserInputError, match="position 9"):
        ips.batch_weights(np.array([9]), np.array([False]))


@pytest.mark.parametrize("fit", ["power_law", "per_position"])
def test_both_fits_recover_a_power_law_ratio(fit):
    position, random, labels = _logs()
    ips = compute_ips_weights(
        position,
        random,
        labels,
        num_positions=5,
        tasks=("a", "b"),
        clip=(0.01, 100.0),
        smoothing=0.0,
        fit=fit,
    )
    ratio = ips.weights_pt[:, 1] / ips.weights_pt[0, 1]
    np.testing.assert_allclose(ratio, 1.0 / (1 + np.arange(5)), rtol=0.1)


def test_power_law_fit_is_stabler_with_few_random_sessions():
    rng = np.random.default_rng(3)
    n, positions = 400_000, 20
    position = rng.integers(0, positions, n)
    random = rng.random(n) < 0.01  # ~200 random impressions per position
    examine = (1.0 + position) ** -0.8
    ctr = examine * np.where(random, 0.05, 0.05 * (1.0 + 1.0 / (1 + position)))
    labels = (rng.random((n, 1)) < ctr[:, None]).astype(np.float32)
    truth = 1.0 / (1.0 + 1.0 / (1 + np.arange(positions)))
    errors = {}
    for fit in ("power_law", "per_position"):
        ips = compute_ips_weights(
            position,
            random,
            labels,
            num_positions=positions,
            tasks=("a",),
            clip=(0.01, 100.0),
            fit=fit,
        )
        estimate = ips.weights_pt[:, 0] / ips.weights_pt[:, 0].mean()
        errors[fit] = np.abs(estimate - truth / truth.mean()).mean()
    assert errors["power_law"] < 0.5 * errors["per_position"], errors


def test_save_load_round_trip(tmp_path):
    position, random, labels = _logs(20_000)
    ips = compute_ips_weights(position, random, labels, num_positions=5, tasks=("a", "b"))
    ips.save(tmp_path / "ips.json")
    loaded = IpsWeights.load(tmp_path / "ips.json")
    np.testing.assert_allclose(loaded.weights_pt, ips.weights_pt)
    assert loaded.tasks == ("a", "b") and "pos" in loaded.format_table()


def test_errors(tmp_path):
    position, random, labels = _logs(1_000)
    with pytest.raises(UserInputError, match="both random-session and ranked"):
        compute_ips_weights(
            position, np.zeros_like(random), labels, num_positions=5, tasks=("a", "b")
        )
    with pytest.raises(UserInputError, match="expected \\[N, 3\\]"):
        compute_ips_weights(position, random, labels, num_positions=5, tasks=("a", "b", "c"))
    with pytest.raises(UserInputError, match="does not exist"):
        IpsWeights.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserInputError, match="fit must be"):
        compute_ips_weights(
            position, random, labels, num_positions=5, tasks=("a", "b"), fit="spline"
        )
    with pytest.raises(UserInputError, match="malformed"):
        IpsWeights.load(tmp_path / "bad.json")
