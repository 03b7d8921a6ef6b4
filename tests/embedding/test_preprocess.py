"""Host-side checks: bad ids, weights and plans fail early with one clear message.

Every error is a UserInputError (the CLI prints it as one line) naming the feature or
table and the bad value. Accepted input forms all give the same padded batch.
"""

import re

import numpy as np
import pytest

from lf_jax import embedding as P
from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding import PlanError, validate_plan
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.preprocess import InvalidIdsError, preprocess
from lf_jax.embedding.spec import FeatureSpec, SpecError, TableSpec, validate_specs
from lf_jax.errors import UserInputError

TABLES = {
    "members": TableSpec(name="members", vocab_size=10, dim=4),
    "tags": TableSpec(name="tags", vocab_size=6, dim=8),
}
HISTORY = FeatureSpec(name="history", table="members", max_ids=3, combiner="mean")
TAGS = FeatureSpec(name="tags", table="tags", max_ids=2, weighted=True)
STRICT = FeatureSpec(name="strict", table="members", max_ids=2, truncate=False)
OOV = FeatureSpec(name="oov", table="members", max_ids=2, oov_row=0)
FEATURES = {f.name: f for f in (HISTORY, TAGS)}


def run(raw_ids, raw_weights=None, features=FEATURES):
    return preprocess(features, TABLES, raw_ids, raw_weights)


def raises(match_all, fn, *args, **kwargs):
    """Asserts fn raises InvalidIdsError whose message contains every string in match_all."""
    with pytest.raises(InvalidIdsError) as info:
        fn(*args, **kwargs)
    for part in match_all:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"
    assert isinstance(info.value, UserInputError)
    return str(info.value)


# ----- accepted forms ----------------------------------------------------------------------
EXPECTED_IDS = np.array([[1, 2, 3], [-1, -1, -1], [7, -1, -1], [9, 9, -1]], np.int32)
EXPECTED_W = np.array([[1, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 0]], np.float32)


@pytest.mark.parametrize(
    "raw",
    [
        [[1, 2, 3], [], [7], [9, 9]],
        [np.array([1, 2, 3]), np.array([], np.int64), np.array([7]), (9, 9)],
        (np.array([1, 2, 3, 7, 9, 9]), np.array([3, 0, 1, 2])),
        np.array([[1, 2, 3], [-1, -1, -1], [7, -1, -1], [9, 9, -1]]),
        np.array([[1, 2, 3, -1], [-1, -1, -1, -1], [7, -1, -1, -1], [9, 9, -1, -1]], np.int64),
        np.array([[1, 2, 3], [-1, -1, -1], [7, -1, -1], [9, 9, -1]], np.int16),
    ],
    ids=["lists", "arrays_per_example", "values_lengths", "padded", "padded_wider", "int16"],
)
def test_accepted_id_forms_give_the_same_batch(raw):
    batch = run({"history": raw, "tags": [[0]] * 4}, {"tags": [[1.0]] * 4})
    np.testing.assert_array_equal(batch.ids["history"], EXPECTED_IDS)
    np.testing.assert_array_equal(batch.weights["history"], EXPECTED_W)
    assert batch.ids["history"].dtype == np.int32 and batch.weights["history"].dtype == np.float32


@pytest.mark.parametrize(
    "raw",
    [[4, 5, 0], np.array([4, 5, 0]), [[4], [5], [0]]],
    ids=["list_of_ints", "1d_array", "lists"],
)
def test_one_id_per_example_forms(raw):
    batch = run({"history": raw, "tags": [[1], [2], [3]]}, {"tags": [[0.5], [1.5], [2.0]]})
    np.testing.assert_array_equal(batch.ids["history"][:, 0], [4, 5, 0])
    np.testing.assert_array_equal(batch.ids["history"][:, 1:], -1)
    np.testing.assert_allclose(batch.weights["tags"][:, 0], [0.5, 1.5, 2.0])


@pytest.mark.parametrize(
    "weights",
    [
        [[0.5, 2.0], [], [3.0]],
        (np.array([0.5, 2.0, 3.0]), np.array([2, 0, 1])),
        np.array([[0.5, 2.0], [0.0, 0.0], [3.0, 0.0]]),  # values at padding are ignored
        np.array([[0.5, 2.0], [9.0, 9.0], [3.0, 9.0]], np.float32),
    ],
    ids=["lists", "values_lengths", "padded_zeros", "padded_any"],
)
def test_accepted_weight_forms(weights):
    ids = np.array([[1, 4], [-1, -1], [5, -1]])
    batch = run({"history": [[1]] * 3, "tags": ids}, {"tags": weights})
    np.testing.assert_allclose(batch.weights["tags"], [[0.5, 2.0], [0, 0], [3.0, 0]])
    np.testing.assert_array_equal(batch.ids["tags"], [[1, 4], [-1, -1], [5, -1]])


def test_truncation_keeps_the_first_max_ids_ids_and_weights():
    batch = run(
        {"history": [[1, 2, 3, 4, 5], [6]], "tags": [[1, 2, 3], []]},
        {"tags": [[0.1, 0.2, 0.3], []]},
    )
    np.testing.assert_array_equal(batch.ids["history"], [[1, 2, 3], [6, -1, -1]])
    np.testing.assert_array_equal(batch.ids["tags"], [[1, 2], [-1, -1]])
    np.testing.assert_allclose(batch.weights["tags"], [[0.1, 0.2], [0, 0]])
    wide = run(
        {"history": np.array([[1, 2, 3, 4], [5, -1, -1, -1]]), "tags": [[0], [0]]},
        {"tags": [[1.0], [1.0]]},
    )
    np.testing.assert_array_equal(wide.ids["history"], [[1, 2, 3], [5, -1, -1]])


def test_truncate_false_raises_naming_feature_and_example():
    features = {"strict": STRICT}
    raises(
        ["'strict'", "example 1", "3 ids", "max_ids=2", "truncate=False"],
        run,
        {"strict": [[1], [1, 2, 3]]},
        features=features,
    )
    raises(
        ["'strict'", "example 0", "max_ids=2"],
        run,
        {"strict": np.array([[1, 2, 3], [1, -1, -1]])},
        features=features,
    )
    # Padding columns beyond max_ids are fine.
    batch = run({"strict": np.array([[1, 2, -1], [1, -1, -1]])}, features=features)
    np.testing.assert_array_equal(batch.ids["strict"], [[1, 2], [1, -1]])


def test_oov_row_maps_out_of_range_ids():
    features = {"oov": OOV}
    batch = run({"oov": [[3, 10], [-4], [99, 9]]}, features=features)
    np.testing.assert_array_equal(batch.ids["oov"], [[3, 0], [0, -1], [0, 9]])
    np.testing.assert_array_equal(batch.weights["oov"], [[1, 1], [1, 0], [1, 1]])
    # In a padded array -1 is padding, not an id; other negatives go to the OOV row.
    batch = run({"oov": np.array([[-1, 5], [-7, -1]])}, features=features)
    np.testing.assert_array_equal(batch.ids["oov"], [[-1, 5], [0, -1]])


# ----- bad ids -----------------------------------------------------------------------------
GOOD_TAGS = {"tags": [[1], [2]]}
GOOD_TAG_W = {"tags": [[1.0], [1.0]]}


@pytest.mark.parametrize(
    "history,parts",
    [
        ([[1, 10], [2]], ["'history'", "id 10", "example 0", "'members'", "[0, 10)", "oov_row"]),
        ([[1], [2, 12345]], ["'history'", "id 12345", "example 1"]),
        ([[1], [-3]], ["'history'", "id -3", "example 1"]),
        ([[1], [-1]], ["'history'", "id -1", "example 1"]),  # -1 pads only padded arrays
        (np.array([[1, -5], [2, -1]]), ["'history'", "id -5", "example 0"]),
        ((np.array([1, 2, 11]), np.array([1, 2])), ["'history'", "id 11", "example 1"]),
        ([[1.5], [2]], ["'history'", "integers", "float64", "example 0"]),
        ([[1], ["7"]], ["'history'", "integers", "<U1", "example 1"]),
        ([[True], [2]], ["'history'", "integers", "bool", "example 0"]),
        ([[1], [None]], ["'history'", "integers", "object", "example 1"]),
        (np.array([[1.0, 2.0], [3.0, 4.0]]), ["'history'", "integers", "float64"]),
        (np.zeros((2, 1, 1), np.int32), ["'history'", "1-D or 2-D", "(2, 1, 1)"]),
        ([[[1, 2]], [3]], ["'history'", "example 0", "not a flat list"]),
        ([[1, [2, 3]], [3]], ["'history'", "example 0", "not a flat list"]),
        ("1 2", ["'history'", "got str"]),
        (7, ["'history'", "got int"]),
        ((np.array([1, 2]), np.array([1, 2])), ["'history'", "lengths sum to 3", "2 ids"]),
        (
            (np.array([1, 2]), np.array([3, -1])),
            ["'history'", "lengths must be >= 0", "-1", "example 1"],
        ),
        (
            (np.array([1, 2]), np.array([1.0, 1.0])),
            ["'history'", "lengths must be integers", "float64"],
        ),
        ((np.array([[1, 2]]), np.array([2])), ["'history'", "1-D", "(1, 2)"]),
    ],
    ids=[
        "out_of_range",
        "far_out_of_range",
        "negative",
        "minus_one_in_list",
        "negative_in_padded",
        "values_lengths_range",
        "float",
        "string",
        "bool",
        "none",
        "float_array",
        "3d_array",
        "nested_bag",
        "ragged_nested_bag",
        "str",
        "int",
        "lengths_sum",
        "negative_length",
        "float_lengths",
        "2d_values",
    ],
)
def test_bad_ids_raise_naming_feature_and_value(history, parts):
    raises(parts, run, {"history": history, **GOOD_TAGS}, GOOD_TAG_W)


def test_mismatched_batch_sizes():
    raises(
        ["'tags'", "3 examples", "expected 2"],
        run,
        {"history": [[1], [2]], "tags": [[1], [2], [3]]},
        {"tags": [[1.0]] * 3},
    )


def test_missing_and_unknown_features():
    raises(["lacks", "'tags'"], run, {"history": [[1]]})
    raises(
        ["unknown", "'histroy'", "history"],
        run,
        {"history": [[1]], "histroy": [[1]], **{"tags": [[1]]}},
        {"tags": [[1.0]]},
    )


@pytest.mark.parametrize(
    "weights,parts",
    [
        (None, ["'tags'", "weighted", "no weights"]),
        ({"tags": [[1.0, 2.0], [1.0]]}, ["'tags'", "example 0", "1 ids", "2 weights"]),
        ({"tags": [[1.0], []]}, ["'tags'", "example 1", "1 ids", "0 weights"]),
        ({"tags": [[1.0]]}, ["'tags'", "1 examples", "ids for 2"]),
        ({"tags": [["a"], [1.0]]}, ["'tags'", "numbers", "<U1", "example 0"]),
        ({"tags": [[1.0], [float("nan")]]}, ["'tags'", "finite", "nan", "example 1"]),
        ({"tags": np.array([[1.0], [np.inf]])}, ["'tags'", "finite", "inf"]),
        ({"tags": [[1.0], [1.0]], "history": [[1.0], [1.0]]}, ["'history'", "not weighted"]),
        ({"tags": [[1.0], [1.0]], "nope": [[1.0]]}, ["'nope'", "unknown"]),
    ],
    ids=["missing", "too_many", "too_few", "batch", "dtype", "nan", "inf", "unweighted", "unknown"],
)
def test_bad_weights_raise_naming_feature_and_value(weights, parts):
    raises(parts, run, {"history": [[1], [2]], "tags": [[1], [2]]}, weights)


def test_spec_errors_name_the_feature():
    with pytest.raises(SpecError, match="'oov'.*oov_row 10.*'members'"):
        validate_specs(
            list(TABLES.values()), [FeatureSpec(name="oov", table="members", oov_row=10)]
        )
    with pytest.raises(SpecError, match="'f'.*'missing'"):
        validate_specs(list(TABLES.values()), [FeatureSpec(name="f", table="missing")])


# ----- plans and batches that do not fit the mesh ------------------------------------------
def full_plan(**changes):
    plan = {"members": P.row_wise(), "tags": P.table_wise()}
    plan.update(changes)
    return plan


@pytest.mark.parametrize(
    "plan,parts",
    [
        (full_plan(ghost=P.row_wise()), ["unknown table", "'ghost'"]),
        ({"members": P.row_wise()}, ["no strategy", "'tags'"]),
        (full_plan(tags={"strategy": "diagonal"}), ["'tags'", "'diagonal'", "unknown"]),
        (full_plan(tags={"axes": ("model",)}), ["'tags'", "None", "unknown"]),
        (full_plan(members=P.row_wise(("expert",))), ["'members'", "('expert',)", "not mesh axes"]),
        (full_plan(members=P.row_wise(())), ["'members'", "()", "not mesh axes"]),
        (full_plan(tags=P.column_wise(3)), ["'tags'", "num_shards 3", "dim 8"]),
        (full_plan(tags=P.column_wise(0)), ["'tags'", "num_shards 0"]),
        (full_plan(tags=P.column_wise(16)), ["'tags'", "num_shards 16"]),
        (full_plan(tags=P.column_wise("2")), ["'tags'", "num_shards '2'"]),
        (full_plan(tags=P.table_wise(device=8)), ["'tags'", "device 8", "[0, 8)"]),
        (full_plan(tags=P.table_wise(device=-1)), ["'tags'", "device -1"]),
        (full_plan(tags=P.table_wise(device="0")), ["'tags'", "device '0'"]),
        (full_plan(tags=P.table_wise_row_wise(axis="expert")), ["'tags'", "'expert'"]),
        (full_plan(tags=P.table_wise_row_wise(group=2)), ["'tags'", "group 2", "[0, 2)"]),
        (full_plan(tags="table_wise"), ["'tags'", "strategy dict", "'table_wise'"]),
    ],
    ids=[
        "unknown_table",
        "missing_table",
        "unknown_strategy",
        "no_strategy",
        "bad_axis",
        "no_axes",
        "cw_not_divisor",
        "cw_zero",
        "cw_too_many",
        "cw_type",
        "tw_device",
        "tw_negative",
        "tw_type",
        "twrw_axis",
        "twrw_group",
        "not_a_dict",
    ],
)
def test_impossible_plans_raise_plan_error_naming_the_table(plan, parts, mesh_2x4):
    for check in (
        lambda: validate_plan(plan, TABLES, mesh_2x4),
        lambda: EmbeddingCollection(list(TABLES.values()), [HISTORY, TAGS], plan, mesh_2x4),
    ):
        with pytest.raises(PlanError) as info:
            check()
        for part in parts:
            assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"
        assert isinstance(info.value, UserInputError)


def test_plan_needs_a_model_axis_for_the_default_row_wise():
    with pytest.raises(PlanError, match=re.escape("row_wise axes ('model',)")):
        validate_plan(full_plan(), TABLES, make_mesh({"data": 8}))


def test_batch_size_must_divide_over_the_devices(mesh_2x4):
    coll = EmbeddingCollection(list(TABLES.values()), [HISTORY, TAGS], full_plan(), mesh_2x4)
    batch = coll.preprocess({"history": [[1]] * 12, "tags": [[1]] * 12}, {"tags": [[1.0]] * 12})
    with pytest.raises(UserInputError, match="batch size 12 does not divide over 8 devices"):
        coll.shard_batch(batch)
    stacked = type(batch)(
        {k: np.stack([v] * 3) for k, v in batch.ids.items()},
        {k: np.stack([v] * 3) for k, v in batch.weights.items()},
    )
    with pytest.raises(UserInputError, match="batch size 12"):
        coll.shard_batch(stacked, leading_dims=1)


def test_activation_gradients_of_the_wrong_shape_name_the_feature(mesh_2x4):
    """A gradient that is not the lookup's output shape (here tags' dim 8 given as 4, or
    a feature left out) is one UserInputError at trace time, before any device work."""
    import jax
    import jax.numpy as jnp

    sequence = FeatureSpec(name="seq", table="members", max_ids=3, combiner="none")
    coll = EmbeddingCollection(
        list(TABLES.values()), [HISTORY, TAGS, sequence], full_plan(), mesh_2x4
    )
    raw = {"history": [[1]] * 8, "tags": [[1]] * 8, "seq": [[2, 3]] * 8}
    batch = coll.shard_batch(coll.preprocess(raw, {"tags": [[1.0]] * 8}))
    state = coll.init(jax.random.key(0))
    good = {"history": jnp.ones((8, 4)), "tags": jnp.ones((8, 8)), "seq": jnp.ones((8, 3, 4))}
    jax.block_until_ready(coll.apply_gradients(state, batch, good))
    with pytest.raises(
        UserInputError,
        match=re.escape("feature 'tags': activation gradient of shape (8, 4), expected (8, 8)"),
    ):
        coll.apply_gradients(state, batch, {**good, "tags": jnp.ones((8, 4))})
    with pytest.raises(
        UserInputError,
        match=re.escape("feature 'seq': activation gradient of shape (8, 4), expected (8, 3, 4)"),
    ):
        coll.apply_gradients(state, batch, {**good, "seq": jnp.ones((8, 4))})
    with pytest.raises(UserInputError, match=re.escape("missing for features ['history']")):
        coll.apply_gradients(state, batch, {k: v for k, v in good.items() if k != "history"})
