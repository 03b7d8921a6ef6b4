import math

import numpy as np
import pytest

from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding import (
    PlanError,
    column_wise,
    data_parallel,
    row_wise,
    table_wise,
    table_wise_row_wise,
    validate_plan,
)
from lf_jax.embedding.exchange import capacity_for
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad, sgd
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.planner import (
    Layout,
    Traffic,
    format_bytes,
    plan_tables,
    table_bytes,
    table_step_cost,
)

MESH = {"data": 2, "model": 4}


def table(name, vocab, dim, optimizer=None):
    return TableSpec(name=name, vocab_size=vocab, dim=dim, optimizer=optimizer or sgd(0.1))


def feature(name, table_name, max_ids=1, combiner="sum"):
    return FeatureSpec(name=name, table=table_name, max_ids=max_ids, combiner=combiner)


@pytest.mark.parametrize(
    "count, text",
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1 KB"),
        (660_000, "660 KB"),
        (5_160_000_000, "5.16 GB"),
        (999_600, "1 MB"),
        (3e12, "3 TB"),
    ],
)
def test_format_bytes(count, text):
    assert format_bytes(count) == text


def test_table_bytes_counts_weights_and_optimizer_slots():
    assert table_bytes(table("t", 1000, 16)) == 1000 * 16 * 4
    assert table_bytes(table("t", 1000, 16, rowwise_adagrad(0.1))) == 1000 * (16 * 4 + 4)
    assert table_bytes(table("t", 1000, 16, adam(0.1))) == 1000 * (16 * 4 + 2 * 16 * 4)


def test_traffic_counts_entries_and_output_columns():
    features = [feature("a", "t", 3), feature("b", "t", 2, "none"), feature("c", "u", 7)]
    assert Traffic.of("t", features) == Traffic(entries=5, columns=3)


def test_step_cost_matches_hand_computed_bytes():
    # b = 64 / 8 = 8 examples per device; E = 5 entries, C = 3 columns, D = 16: M = 40.
    t = table("t", 1000, 16)
    features = [feature("a", "t", 3), feature("b", "t", 2, "none")]
    row = 4 + 16 * 4  # an id out, a float32 row back (or a gradient out)

    def cost(entry):
        plan = {"t": entry}
        return table_step_cost(t, Layout.of([t], plan, MESH), features, 64)

    # data_parallel: no forward exchange; the update all-gathers the other 7 replicas'
    # entries (12 B each) and output gradients: fewer bytes than their 40 unique rows'
    # gradients (40 x 68 B) for these bags.
    dp = cost(data_parallel())
    assert (dp.forward_comm, dp.update_comm) == (0, 7 * (40 * 12 + 8 * 3 * 16 * 4))
    # one id per example: the unique rows' gradients are fewer bytes, so those travel
    one_id = [feature("a", "t", 1)]
    dp1 = table_step_cost(t, Layout.of([t], {"t": data_parallel()}, MESH), one_id, 64)
    assert dp1.update_comm == 7 * 8 * row
    # row_wise over model: 4 owners, capacity for a 1/4 share; 2 replicas over data.
    k = 4 * capacity_for(40, 1 / 4, 250)
    rw = cost(row_wise("model"))
    assert rw.forward_comm == int(3 / 4 * k * row)
    # the update: gradients only to the owners (they kept the forward's ids), then ids and
    # gradients gathered from the other replica
    assert rw.update_comm == int(3 / 4 * k * 16 * 4) + 1 * k * row
    # all axes: 8 owners, no replicas: the update sends back the rows' gradients.
    k8 = 8 * capacity_for(40, 1 / 8, 125)
    everywhere = cost(row_wise(("data", "model")))
    assert everywhere.forward_comm == int(7 / 8 * k8 * row)
    assert everywhere.update_comm == int(7 / 8 * k8 * 16 * 4)
    # a column piece of 8: each piece is exchanged on its own, at half the row bytes
    half = 8 * capacity_for(40, 1.0, 1000) * (4 + 8 * 4)
    assert cost(column_wise(2)).forward_comm == 2 * int(7 / 8 * half)


def test_layout_pads_stacks_and_splits_rows():
    tables = [table("a", 1001, 16), table("b", 300, 16), table("c", 50, 16), table("d", 10, 8)]
    plan = {"a": row_wise("model"), "b": table_wise(2), "c": table_wise(5), "d": data_parallel()}
    layout = Layout.of(tables, validate_plan(plan, {t.name: t for t in tables}, MESH), MESH)
    row16 = 16 * 4
    # a: ceil(1001 / 4) rows per device; b and c share one stack padded to 300 rows; d: 10.
    assert layout.allocated_per_device() == 251 * row16 + 300 * row16 + 10 * 8 * 4
    used = layout.used_per_device()
    assert used[2] == (251 + 300) * row16 + 320 and used[5] == (251 + 50) * row16 + 320
    assert used[0] == 251 * row16 + 320
    assert layout.table_per_device("b").tolist() == [0, 0, 300 * row16, 0, 0, 0, 0, 0]


def test_layout_is_the_engine_layout_on_a_mesh_shape_without_devices():
    """64 devices are laid out on this 8-device machine: the planner runs the engine's
    own build_layout on a mesh shape, nothing is allocated."""
    tables = [
        table("m", 1001, 16, rowwise_adagrad(0.1)),
        table("h", 300, 16),
        table("w", 200, 32),
        table("g", 70, 16),
        table("p", 10, 8, adam(0.1)),
    ]
    plan = {
        "m": row_wise("model"),
        "h": table_wise(3),
        "w": column_wise(4),
        "g": table_wise_row_wise(1, "model"),
        "p": data_parallel(),
    }
    shape = {"data": 8, "model": 8}
    by_name = {t.name: t for t in tables}
    layout = Layout.of(tables, validate_plan(plan, by_name, shape), shape)
    assert {g.num_slots for g in layout.groups} == {1, 8, 64}
    assert layout.table_per_device("m").max() == math.ceil(1001 / 8) * (16 * 4 + 4)
    assert len(set(layout.devices_of("w"))) == 4  # column pieces on distinct devices
    group_g = next(g for g in layout.groups if any(p.table == "g" for p in g.pieces))
    piece_g = next(p for p in group_g.pieces if p.table == "g")
    assert piece_g.slots() == list(range(8, 16))  # data index 1, all of model


def ranker_specs():
    tables = [
        table("huge", 3_000_000, 64, rowwise_adagrad(0.05)),  # 780 MB
        table("big", 1_000_000, 64, rowwise_adagrad(0.05)),  # 260 MB
        table("wide", 500_000, 512),  # 1.02 GB, dim 512
        table("medium_a", 200_000, 32),
        table("medium_b", 150_000, 32),
        table("medium_c", 100_000, 32),  # 25.6 / 19.2 / 12.8 MB
        table("small", 1000, 16, adam(0.01)),
    ]  # 192 KB
    features = [feature(t.name, t.name) for t in tables] + [feature("hist", "huge", 10, "mean")]
    return tables, features


def test_strategy_per_size_class():
    tables, features = ranker_specs()
    # budget 1 GB: small <= 10 MB, medium <= 250 MB
    result = plan_tables(
        tables, features, {"data": 2, "model": -1}, 256, 1_000_000_000, device_count=8
    )
    plan = result.plan
    assert plan["small"] == data_parallel()
    assert plan["huge"] == row_wise("model")  # 780 MB > 250 MB, shard 195 MB <= 250 MB
    assert plan["big"] == row_wise("model")  # 260 MB > 250 MB
    assert plan["wide"]["strategy"] == "column_wise" and plan["wide"]["num_shards"] == 8
    # medium tables: a whole table would pad every device of its d32 stack to its height,
    # so rows split over the model axis cost less for the same traffic
    for name in ("medium_a", "medium_b", "medium_c"):
        assert plan[name] == row_wise("model"), name
    rows = {row.table: row for row in result.rows}
    assert "rows split over model (4 devices)" in rows["huge"].why
    assert "replicated" in rows["small"].why
    assert "table_wise would pad every device" in rows["medium_a"].why
    assert "column pieces" in rows["wide"].why
    assert [row.table for row in result.rows][:2] == ["wide", "huge"]  # largest first


def test_row_wise_over_all_axes_when_a_model_shard_is_too_big():
    tables = [table("giant", 8_000_000, 64)]  # 2.05 GB, model shard 512 MB > 25% of 1 GB
    result = plan_tables(tables, [feature("f", "giant")], MESH, 64, 1_000_000_000)
    assert result.plan["giant"] == {"strategy": "row_wise", "axes": ("data", "model")}
    assert "over all 8 devices" in result.rows[0].why
    assert result.rows[0].per_device_bytes == 1_000_000 * 256


def test_medium_tables_of_one_dim_share_one_padded_stack():
    # three 240 MB d64 tables: one per device, the stack is 937,500 rows high everywhere
    tables = [table(f"t{i}", 937_500, 64) for i in range(3)]
    features = [feature(f"f{i}", f"t{i}") for i in range(3)]
    hand = {f"t{i}": {"strategy": "table_wise"} for i in range(3)}
    result = plan_tables(tables, features, MESH, 64, 1_000_000_000, hand)
    assert sorted(result.plan[f"t{i}"]["device"] for i in range(3)) == [0, 1, 2]
    assert result.weight_bytes == 240_000_000
    assert sorted(result.used_bytes) == [0] * 5 + [240_000_000] * 3
    assert "up to 240 MB of it stack padding" in result.format_table()


def test_fallback_reason_names_the_rejected_strategy():
    # giant: 6.4 GB -> rows over all 8 devices, 800 MB each, in the all-axes d64 stack.
    # a (240 MB, medium) on top of that stack would pad every device to 1.04 GB > 1 GB.
    tables = [table("giant", 25_000_000, 64), table("a", 937_500, 64)]
    features = [feature("fg", "giant"), feature("fa", "a")]
    result = plan_tables(tables, features, MESH, 64, 1_000_000_000)
    rows = {row.table: row for row in result.rows}
    assert result.plan["giant"] == row_wise(("data", "model"))
    assert result.plan["a"] == row_wise("model")
    assert rows["a"].why.startswith("table_wise would pad every device to 1.04 GB")
    assert result.max_device_bytes <= 1_000_000_000


def test_hand_plan_overrides_only_the_tables_it_names():
    tables, features = ranker_specs()
    hand = {
        "small": {"strategy": "row_wise", "axes": ["data", "model"]},
        "medium_a": {"strategy": "table_wise", "device": None},
    }
    result = plan_tables(tables, features, MESH, 256, 1_000_000_000, hand)
    assert result.plan["small"] == {"strategy": "row_wise", "axes": ("data", "model")}
    assert result.plan["medium_a"]["strategy"] == "table_wise"
    assert isinstance(result.plan["medium_a"]["device"], int)  # auto-placed by the planner
    assert result.plan["huge"] == row_wise("model")
    rows = {row.table: row for row in result.rows}
    assert rows["small"].why == "hand plan" and rows["huge"].why != "hand plan"


def test_full_hand_plan_is_kept():
    tables, features = ranker_specs()
    hand = {t.name: row_wise(("data", "model")) for t in tables}
    result = plan_tables(tables, features, MESH, 256, 1_000_000_000, hand)
    assert result.plan == validate_plan(hand, {t.name: t for t in tables}, make_mesh(MESH))


def test_hand_plan_errors():
    tables, features = ranker_specs()
    with pytest.raises(PlanError, match=r"unknown table\(s\) \['nope'\]"):
        plan_tables(tables, features, MESH, 256, 1_000_000_000, {"nope": data_parallel()})
    with pytest.raises(PlanError, match="strategy 'diagonal' is unknown"):
        plan_tables(tables, features, MESH, 256, 1_000_000_000, {"small": {"strategy": "diagonal"}})
    with pytest.raises(PlanError, match=r"hand plan for table 'huge' \(data_parallel, 780 MB"):
        plan_tables(tables, features, MESH, 256, 500_000_000, {"huge": data_parallel()})


def test_impossible_budget_names_table_bytes_and_budget():
    tables = [table("member", 4_000_000, 128, rowwise_adagrad(0.05))]
    with pytest.raises(PlanError) as error:
        plan_tables(
            tables,
            [feature("m", "member")],
            {"data": 2, "model": -1},
            64,
            100_000_000,
            device_count=8,
        )
    message = str(error.value)
    assert "table 'member'" in message and "2064000000 bytes" in message
    assert "100 MB (100000000 bytes)" in message and "\n" not in message


@pytest.mark.parametrize(
    "shape", [{"data": 8}, {"data": 2, "model": 4}, {"data": 4, "model": 2}, {"model": 8}]
)
def test_plan_validates_against_a_real_mesh(shape):
    tables, features = ranker_specs()
    result = plan_tables(tables, features, shape, 256, 2_000_000_000)
    mesh = make_mesh(shape)
    assert validate_plan(result.plan, {t.name: t for t in tables}, mesh) == result.plan
    assert len(result.device_bytes) == 8 and result.max_device_bytes <= 2_000_000_000


def test_mesh_with_minus_one_plans_for_devices_it_does_not_have():
    tables, features = ranker_specs()
    result = plan_tables(
        tables, features, {"data": 8, "model": -1}, 4096, 1_000_000_000, device_count=64
    )
    assert result.mesh_shape == {"data": 8, "model": 8} and len(result.used_bytes) == 64
    assert result.plan["huge"] == row_wise("model")
    with pytest.raises(PlanError, match="pass device_count"):
        plan_tables(tables, features, {"data": -1}, 256, 1_000_000_000)


def test_bad_inputs_are_plan_errors():
    tables, features = ranker_specs()
    with pytest.raises(PlanError, match="batch_size 100 is not divisible by the 8 devices"):
        plan_tables(tables, features, MESH, 100, 1_000_000_000)
    with pytest.raises(PlanError, match="memory_budget_bytes must be a positive int, got 0"):
        plan_tables(tables, features, MESH, 256, 0)


def test_format_table_is_aligned_with_units_and_summary():
    tables, features = ranker_specs()
    result = plan_tables(tables, features, MESH, 256, 1_000_000_000)
    text = result.format_table()
    lines = text.splitlines()
    assert lines[0].startswith("plan for mesh data=2 x model=4 (8 devices), batch 256")
    assert lines[1].split() == [
        "table",
        "rows",
        "dim",
        "bytes",
        "strategy",
        "per-device",
        "activations",
        "exchanged/step",
        "why",
    ]
    assert len(lines) == 3 + len(tables) + 1
    assert lines[-1].startswith("max per device: ") and "of 1 GB budget" in lines[-1]
    assert (
        "3,000,000" in text
        and "780 MB" in text
        and "1.02 GB" in text
        and "KB" in text
        and "MB" in text
    )
    column = lines[1].index("strategy")
    assert all(line[column - 2 : column] == "  " for line in lines[3:-1])
    per_device = np.asarray(result.device_bytes)
    assert (per_device == result.weight_bytes + result.activation_bytes).all()
