"""The grain feed pipeline: padding, sharding, exact resume in a fresh process, eval pass."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lf_jax.input import EvalReader, PipelineError, pad_lists, train_iterator

LENGTHS = {"post_hashtags": 3, "history_actors": 20, "history_hashtags": 50}


def _keys(batch):
    return batch["session_id"].astype(np.int64) * 20 + batch["position"]


def test_pad_lists_pads_and_truncates():
    out = pad_lists(
        {
            "post_hashtags": [4, 9],
            "history_actors": list(range(12)),
            "member_id": 3,
            "dense": np.ones(8, np.float64),
        },
        {"post_hashtags": 3, "history_actors": 5},
    )
    np.testing.assert_array_equal(out["post_hashtags"], [4, 9, -1])
    np.testing.assert_array_equal(out["history_actors"], [0, 1, 2, 3, 4])
    assert out["post_hashtags"].dtype == np.int32 and out["member_id"].dtype == np.int32
    assert out["dense"].dtype == np.float32


def test_pipeline_batches_pad_and_truncate_source_records(feed_builder):
    source = feed_builder.as_data_source("holdout_ranked")
    it = train_iterator(
        feed_builder,
        "holdout_ranked",
        global_batch_size=256,
        shuffle=False,
        num_epochs=1,
        max_lengths=LENGTHS,
        shard_index=1,
        shard_count=2,
    )
    batch = next(it)
    assert it.signature["shard_index"] == 1 and it.signature["batch_size"] == 128
    assert batch["history_actors"].shape == (128, 20) and batch["post_hashtags"].shape == (128, 3)
    assert batch["history_hashtags"].shape == (128, 50) and batch["dense"].shape == (128, 8)
    assert batch["labels"].shape == batch["true_probs"].shape == (128, 4)
    assert batch["member_id"].shape == (128,) and batch["random_session"].dtype == np.bool_
    stored = []
    for row in range(128):
        record = source[1 + 2 * row]  # shard 1 of 2 = records 1, 3, 5, ...
        assert batch["member_id"][row] == record["member_id"]
        stored.append(len(record["history_actors"]))
        for name, length in LENGTHS.items():
            ids = np.asarray(record[name])[:length]
            np.testing.assert_array_equal(batch[name][row, : ids.size], ids)
            assert (batch[name][row, ids.size :] == -1).all()
    stored = np.array(stored)
    assert (stored > 20).any() and (stored < 20).any()  # some truncated, some padded


def test_defaults_to_this_process_shard(feed_builder):
    it = train_iterator(feed_builder, global_batch_size=64)
    assert (it.signature["shard_index"], it.signature["shard_count"]) == (0, 1)
    assert next(it)["history_actors"].shape == (64, 50)


def test_two_shards_are_disjoint_and_cover_an_epoch(feed_builder):
    n = len(feed_builder.as_data_source("holdout_ranked"))  # 3000
    keys = []
    for shard in range(2):
        it = train_iterator(
            feed_builder,
            "holdout_ranked",
            global_batch_size=200,
            seed=3,
            num_epochs=1,
            shard_index=shard,
            shard_count=2,
        )
        batches = list(it)
        assert len(batches) == n // 2 // 100
        keys.append(np.concatenate([_keys(b) for b in batches]))
    assert len(set(keys[0])) == len(keys[0]) and not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == n
    assert not np.array_equal(np.sort(keys[0]), keys[0])  # shuffled


def test_epochs_reshuffle_and_repeat(feed_builder):
    it = train_iterator(feed_builder, "holdout_ranked", global_batch_size=3000, seed=0)
    first = np.concatenate([_keys(next(it)) for _ in range(2)])  # 6000 = one epoch
    second = np.concatenate([_keys(next(it)) for _ in range(2)])
    assert set(first) == set(second) and not np.array_equal(first, second)


RESUME_SCRIPT = """
import json, sys
import numpy as np
from lf_jax.input import build_dataset, train_iterator
data_dir, state_file, out_file = sys.argv[1:4]
builder = build_dataset("feed_logs", "tiny", data_dir=data_dir)
it = train_iterator(builder, global_batch_size=64, seed=7, max_lengths={"history_actors": 9},
                    shard_index=1, shard_count=2)
it.set_state(json.load(open(state_file)))
batches = [next(it) for _ in range(4)]
np.savez(out_file, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
"""


@pytest.mark.slow
def test_exact_resume_in_a_fresh_process(feed_builder, feed_data_dir, tmp_path):
    it = train_iterator(
        feed_builder,
        global_batch_size=64,
        seed=7,
        max_lengths={"history_actors": 9},
        shard_index=1,
        shard_count=2,
    )
    for _ in range(5):
        next(it)
    state = it.get_state()
    (tmp_path / "state.json").write_text(json.dumps(state))
    expected = [next(it) for _ in range(4)]
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RESUME_SCRIPT,
            str(feed_data_dir),
            str(tmp_path / "state.json"),
            str(tmp_path / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    for i, batch in enumerate(expected):
        for name, value in batch.items():
            np.testing.assert_array_equal(got[f"{i}/{name}"], value, err_msg=name)
    # The same state restores in this process too (and a JSON string is accepted).
    again = train_iterator(
        feed_builder,
        global_batch_size=64,
        seed=7,
        max_lengths={"history_actors": 9},
        shard_index=1,
        shard_count=2,
    )
    again.set_state(json.dumps(state))
    np.testing.assert_array_equal(next(again)["member_id"], expected[0]["member_id"])


def test_state_from_another_pipeline_is_refused(feed_builder):
    state = train_iterator(
        feed_builder, global_batch_size=64, seed=7, shard_index=0, shard_count=2
    ).get_state()
    other = train_iterator(feed_builder, global_batch_size=64, seed=8, shard_index=0, shard_count=2)
    with pytest.raises(PipelineError, match="seed=7 but this pipeline has seed=8"):
        other.set_state(state)
    with pytest.raises(PipelineError, match="keys 'pipeline' and 'grain'"):
        other.set_state({"next_index": 3})
    # grain's state for worker processes has another form: a worker-count change is named
    saved_with_workers = {
        "pipeline": {**state["pipeline"], "worker_count": 2},
        "grain": state["grain"],
    }
    same_seed = train_iterator(
        feed_builder, global_batch_size=64, seed=7, shard_index=1, shard_count=2
    )
    with pytest.raises(PipelineError, match="worker_count=2 but this pipeline has worker_count=0"):
        same_seed.set_state(saved_with_workers)
    same_seed.set_state(state)  # another shard of the same order: fine


def test_bad_arguments_are_named(feed_builder):
    with pytest.raises(PipelineError, match="not divisible by shard_count=3"):
        train_iterator(feed_builder, global_batch_size=64, shard_index=0, shard_count=3)
    with pytest.raises(PipelineError, match="split 'test'"):
        train_iterator(feed_builder, "test", global_batch_size=64)
    with pytest.raises(PipelineError, match=r"unknown list field\(s\) \['history'\]"):
        train_iterator(feed_builder, global_batch_size=64, max_lengths={"history": 3})
    with pytest.raises(PipelineError, match="shard_index must be in"):
        train_iterator(feed_builder, global_batch_size=64, shard_index=2, shard_count=2)
    with pytest.raises(PipelineError, match="worker_count must be an int >= 0.*got -1"):
        train_iterator(feed_builder, global_batch_size=64, worker_count=-1)
    with pytest.raises(PipelineError, match="fewer than one batch"):
        train_iterator(feed_builder, "holdout_ranked", global_batch_size=8192)


@pytest.mark.parametrize("shard_count", [1, 3])
def test_eval_reader_yields_every_example_once(feed_builder, shard_count):
    source = feed_builder.as_data_source("holdout_ranked")
    n = len(source)  # 6,000
    seen, lengths = [], set()
    for shard in range(shard_count):
        reader = EvalReader(
            feed_builder,
            "holdout_ranked",
            global_batch_size=96 * shard_count,
            max_lengths={"history_hashtags": 10},
            shard_index=shard,
            shard_count=shard_count,
        )
        batches = list(reader)
        lengths.add(len(batches))
        per_shard = -(-n // shard_count)  # ceil
        assert len(batches) == len(reader) == -(-per_shard // 96)
        for batch in batches:
            assert all(len(v) == 96 for v in batch.values())
            valid = batch["valid"]
            seen.append(_keys(batch)[valid])
            assert (batch["history_hashtags"][~valid] == -1).all()
            assert (batch["member_id"][~valid] == 0).all() and (batch["labels"][~valid] == 0).all()
        assert not batches[-1]["valid"].all()
    assert len(lengths) == 1  # processes step together
    seen = np.concatenate(seen)
    expected = np.array([source[i]["session_id"] * 20 + source[i]["position"] for i in range(n)])
    assert len(seen) == n and set(seen) == set(expected)


def test_eval_reader_max_examples_reads_the_first_records(feed_builder):
    source = feed_builder.as_data_source("holdout_ranked")
    reader = EvalReader(feed_builder, "holdout_ranked", global_batch_size=96, max_examples=250)
    batches = list(reader)
    assert len(batches) == len(reader) == 3 and reader.num_examples == 250
    keys = np.concatenate([_keys(batch)[batch["valid"]] for batch in batches])
    expected = [source[i]["session_id"] * 20 + source[i]["position"] for i in range(250)]
    assert keys.tolist() == expected
    everything = EvalReader(
        feed_builder, "holdout_ranked", global_batch_size=96, max_examples=10**9
    )
    assert everything.num_examples == len(source)
    with pytest.raises(PipelineError, match="max_examples must be a positive int, got 0"):
        EvalReader(feed_builder, "holdout_ranked", global_batch_size=96, max_examples=0)
