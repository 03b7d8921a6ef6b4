import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lf_jax import embedding as emb
from lf_jax.distributed.mesh import make_mesh
from lf_jax.errors import UserInputError
from lf_jax.models.ranker import FeedRanker
from lf_jax.train.checkpoint import Checkpointer, flatten_to_dict
from lf_jax.train.step import init_train_state

TABLES = [
    emb.TableSpec(name="member", vocab_size=64, dim=8, optimizer=emb.rowwise_adagrad(0.1)),
    emb.TableSpec(name="tag", vocab_size=30, dim=8, optimizer=emb.adam(0.01)),
]
FEATURES = [
    emb.FeatureSpec(name="member", table="member"),
    emb.FeatureSpec(name="tags", table="tag", max_ids=3, combiner="mean"),
]


def _state(mesh, plan, seed):
    collection = emb.EmbeddingCollection(TABLES, FEATURES, plan, mesh)
    model = FeedRanker(
        field_dims={"member": 8, "tags": 8},
        num_dense=2,
        tasks=("a",),
        mlp_dims=(8,),
        rngs=nnx.Rngs(seed),
    )
    graphdef, params = nnx.split(model)
    tx = optax.adam(1e-3)
    state = init_train_state(params, tx, collection.init(jax.random.key(seed)))
    return collection, state


def _host(collection, state):
    flat = {
        k: np.asarray(v)
        for k, v in flatten_to_dict({k: v for k, v in state.items() if k != "embedding"}).items()
    }
    return (
        flat,
        collection.logical_tables(state["embedding"]),
        collection.logical_slots(state["embedding"]),
    )


def test_restore_onto_another_mesh_and_plan_is_exact(tmp_path):
    mesh_a = make_mesh({"data": 2, "model": 4})
    collection_a, state_a = _state(mesh_a, {"member": emb.row_wise(), "tag": emb.column_wise(2)}, 0)
    # make slots non-trivial: one sparse step
    batch = collection_a.shard_batch(
        collection_a.preprocess(
            {"member": np.arange(16) * 3, "tags": np.arange(48).reshape(16, 3) % 30}
        )
    )

    @jax.jit
    def sparse_step(embedding_state, batch):
        acts = collection_a.lookup(embedding_state["tables"], batch)
        return collection_a.apply_gradients(
            embedding_state, batch, jax.tree.map(jnp.ones_like, acts)
        )

    state_a["embedding"] = sparse_step(state_a["embedding"], batch)
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(7, state_a, collection_a, data_state={"train": {"position": 5}})
    ckpt.wait()
    expected = _host(collection_a, state_a)

    mesh_b = make_mesh({"data": 8})
    collection_b, template = _state(
        mesh_b, {"member": emb.table_wise(), "tag": emb.data_parallel()}, 1
    )
    restored, data_state = Checkpointer(tmp_path / "ckpt").restore(7, template, collection_b)
    got = _host(collection_b, restored)
    assert data_state == {"train": {"position": 5}}
    for key, value in expected[0].items():
        np.testing.assert_array_equal(got[0][key], value, err_msg=key)
    for name in expected[1]:
        np.testing.assert_array_equal(got[1][name], expected[1][name])
    np.testing.assert_array_equal(
        got[2]["member"]["accumulator"], expected[2]["member"]["accumulator"]
    )
    np.testing.assert_array_equal(got[2]["tag"]["mu"], expected[2]["tag"]["mu"])
    assert int(restored["embedding"]["step"]) == 1
    assert (
        restored["embedding"]["tables"][collection_b.groups[0].name].sharding.mesh.shape
        == mesh_b.shape
    )


def test_missing_step_is_a_clear_error(tmp_path):
    mesh = make_mesh({"data": 8})
    collection, state = _state(mesh, {"member": emb.data_parallel(), "tag": emb.data_parallel()}, 0)
    with pytest.raises(UserInputError, match="step 3 not found"):
        Checkpointer(tmp_path / "c").restore(3, state, collection)


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserInputError, match="cannot be created"):
        Checkpointer(blocker / "sub")


def test_column_wise_adagrad_resumes_exactly(tmp_path):
    """Row-wise Adagrad on a column_wise table keeps one accumulator per column piece;
    save, restore (same and another mesh) and train on equals training uninterrupted."""
    tables = [
        emb.TableSpec(name="member", vocab_size=64, dim=8, optimizer=emb.rowwise_adagrad(0.1))
    ]
    features = [emb.FeatureSpec(name="member", table="member", max_ids=2, combiner="sum")]
    mesh = make_mesh({"data": 2, "model": 4})
    rng = np.random.default_rng(0)
    batches = [{"member": rng.integers(0, 64, (16, 2))} for _ in range(4)]
    # piece-dependent gradients: each column piece sees a different squared-gradient sum
    grads = [rng.normal(size=(16, 8)).astype(np.float32) * np.arange(1, 9) for _ in range(4)]

    def train(collection, embedding_state, steps):
        @jax.jit
        def step(embedding_state, batch, grad):
            return collection.apply_gradients(embedding_state, batch, {"member": grad})

        for i in steps:
            batch = collection.shard_batch(collection.preprocess(batches[i]))
            grad = jax.device_put(grads[i], collection.batch_sharding())
            embedding_state = step(embedding_state, batch, grad)
        return embedding_state

    def run(plan, mesh=mesh):
        collection = emb.EmbeddingCollection(tables, features, {"member": plan}, mesh)
        return collection, collection.init(jax.random.key(0))

    collection, uninterrupted = run(emb.column_wise(4))
    uninterrupted = train(collection, uninterrupted, range(4))
    want = collection.logical_tables(uninterrupted)["member"]

    collection, state = run(emb.column_wise(4))
    state = train(collection, state, range(2))
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(2, {"step": jnp.asarray(2), "embedding": state}, collection)
    ckpt.close()
    for restore_mesh in (mesh, make_mesh({"data": 8})):  # the same plan on another mesh
        collection, template = run(emb.column_wise(4), restore_mesh)
        restored, _ = Checkpointer(tmp_path / "ckpt").restore(
            2, {"step": jnp.asarray(0), "embedding": template}, collection
        )
        resumed = train(collection, restored["embedding"], range(2, 4))
        np.testing.assert_array_equal(collection.logical_tables(resumed)["member"], want)


def test_dynamic_tables_restore_onto_another_device_count(tmp_path):
    """A trainer checkpoint of dynamic tables on 8 devices: restore_newest with the
    4-device DynamicTables rehashes every key with its rows and slots (equal to the
    8-device content); without ``dynamic`` the device counts are named."""
    from lf_jax.embedding.dynamic.policy import DynamicPolicy
    from lf_jax.embedding.dynamic.tables import DynamicTables
    from lf_jax.train.checkpoint import CheckpointMismatchError

    def make(devices):
        mesh = make_mesh({"data": devices}, devices=jax.devices()[:devices])
        policy = DynamicPolicy(eviction="lru", admit_after=2, sketch_width=16, ttl_steps=3)
        tables = [
            emb.TableSpec(
                name="post",
                vocab_size=64,
                dim=4,
                optimizer=emb.rowwise_adagrad(0.3),
                dynamic=policy,
            ),
            TABLES[1],
        ]
        features = [emb.FeatureSpec(name="p", table="post", max_ids=3), FEATURES[1]]
        plan = {"post": emb.row_wise("data"), "tag": emb.table_wise()}
        return DynamicTables(emb.EmbeddingCollection(tables, features, plan, mesh))

    dyn8, dyn4 = make(8), make(4)

    @jax.jit
    def step(both, keys):
        both, batch = dyn8.resolve(both, keys)
        grads = {"p": jnp.ones((16, 4)), "tags": jnp.ones((16, 8))}
        both["embedding"] = dyn8.collection.apply_gradients(both["embedding"], batch, grads)
        return both

    rng = np.random.default_rng(0)
    both = dyn8.init(jax.random.key(0))
    for _ in range(4):  # keys seen twice are admitted; grads move their rows and slots
        raw = {
            "p": [[int(k) * 7919 for k in rng.integers(0, 40, 3)] for _ in range(16)],
            "tags": [list(rng.integers(0, 30, 2)) for _ in range(16)],
        }
        both = step(both, dyn8.shard_batch(dyn8.preprocess(raw)))
    state8 = {"params": {"w": jnp.zeros((3,))}, "embedding": both["embedding"]}
    state8["dynamic"] = both["index"]
    ckpt = Checkpointer(tmp_path / "c", async_save=False)
    ckpt.save(4, state8, dyn8.collection)
    empty4 = dyn4.init(jax.random.key(1))
    template = {**state8, "embedding": empty4["embedding"], "dynamic": empty4["index"]}
    with pytest.raises(
        CheckpointMismatchError,
        match=r"hash tables of 8 devices \('dynamic.post.\w+'\), this run has 4: restore "
        r"with dynamic=",
    ):
        ckpt.restore_newest(template, dyn4.collection)
    restored, _, step = ckpt.restore_newest(template, dyn4.collection, dynamic=dyn4)
    ckpt.close()
    want = dyn8.snapshot(both)["post"]
    got = dyn4.snapshot({"embedding": restored["embedding"], "index": restored["dynamic"]})
    assert step == 4 and restored["dynamic"]["post"]["key_hi"].shape == (4, 16)
    assert len(want["keys"]) > 10 and got["post"]["keys"].tolist() == want["keys"].tolist()
    for field in ("rows", "last", "freq"):
        np.testing.assert_array_equal(got["post"][field], want[field], err_msg=field)
    np.testing.assert_array_equal(got["post"]["slots"]["accumulator"], want["slots"]["accumulator"])
    assert (
        dyn4.counters({"embedding": restored["embedding"], "index": restored["dynamic"]})["post"][
            "inserts"
        ]
        == dyn8.counters(both)["post"]["inserts"]
    )
    sketch = np.asarray(restored["dynamic"]["post"]["sketch"])
    np.testing.assert_array_equal(sketch[3], np.asarray(both["index"]["post"]["sketch"]).sum(0))
    tags = dyn8.collection.logical_tables(both["embedding"])["tag"]
    np.testing.assert_array_equal(
        dyn4.collection.logical_tables(restored["embedding"])["tag"], tags
    )
