"""The fused CPU kernel of the local sparse step (lf_jax.embedding.kernels) against the
numpy oracle and the XLA path, on one device where every group is local.

Both kernels run the oracle comparison of test_strategies (every optimizer, combiner,
per-id weights, padding, empty bags, duplicate ids, several tables stacked in a group;
forward every step, tables and slots after steps 1 and 3, untouched rows bit-identical).
Then: heavy duplicates, 16-bit tables, exact micro-batch accumulation, donation (no
table copy), one compile across steps, and the kernel setting's errors.
"""

import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_strategies import FEATURES, TABLES, assert_matches_oracle

from lf_jax import embedding as P
from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding.collection import EmbeddingCollection
from lf_jax.embedding.kernels import build, fused
from lf_jax.embedding.sparse_optim import adam, rowwise_adagrad, sgd
from lf_jax.embedding.spec import FeatureSpec, TableSpec
from lf_jax.errors import UserInputError
from lf_jax.testing import embedding_oracle as oracle
from lf_jax.testing.compilation import count_compilations

KERNELS = ("fused", "xla")
OPTIMIZERS = {"sgd": sgd(0.5), "adagrad": rowwise_adagrad(0.5), "adam": adam(0.1)}


@pytest.fixture(scope="module")
def one():
    return make_mesh({"data": 1}, devices=jax.devices()[:1])


def _collection(tables, features, mesh, kernel):
    plan = {t.name: P.data_parallel() for t in tables}
    return EmbeddingCollection(tables, features, plan, mesh, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_one_device_matches_oracle(kernel, one):
    coll = _collection(TABLES, FEATURES, one, kernel)
    assert set(coll.kernels.values()) == {kernel}
    assert any(len(g.pieces) > 1 for g in coll.groups)
    assert_matches_oracle(coll, TABLES, FEATURES)


def _dup_batch(features, rng, batch, vocab):
    """Bags full of repeats: ids from zipf over a few rows, some padding (-1)."""
    ids, weights = {}, {}
    for f in features:
        x = np.minimum(rng.zipf(1.3, size=(batch, f.max_ids)), vocab) - 1
        x[rng.random((batch, f.max_ids)) < 0.2] = -1
        ids[f.name] = x
        if f.weighted:
            weights[f.name] = rng.uniform(0.5, 2, x.shape).astype(np.float32)
    return ids, weights


def _run(coll, batches, grads, dtype_tables=None):
    state = coll.init(jax.random.key(1))
    if dtype_tables is not None:
        state = coll.state_from_logical(dtype_tables)
    lookup, update = jax.jit(coll.lookup), jax.jit(coll.apply_gradients, donate_argnums=0)
    acts = []
    for batch, g in zip(batches, grads, strict=True):
        acts.append(jax.device_get(lookup(state["tables"], batch)))
        state = update(state, batch, g)
    return acts, jax.device_get(jax.jit(coll.to_logical)(state))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_duplicates_match_xla_path(optimizer, one):
    """Zipf ids (most entries repeat a row), 3 steps: fused == XLA path up to float
    summation order (the rows reach values of ~300 with SGD at rate 0.5)."""
    tables = [
        TableSpec(name=f"t{i}", vocab_size=40, dim=16, optimizer=OPTIMIZERS[optimizer])
        for i in range(2)
    ]
    features = [
        FeatureSpec(name="a", table="t0", max_ids=12, combiner="sum", weighted=True),
        FeatureSpec(name="b", table="t1", max_ids=6, combiner="mean"),
        FeatureSpec(name="c", table="t0", max_ids=3, combiner="none"),
    ]
    rng = np.random.default_rng(0)
    results = []
    for kernel in KERNELS:
        coll = _collection(tables, features, one, kernel)
        raw = [_dup_batch(features, np.random.default_rng(s), 64, 40) for s in range(3)]
        batches = [coll.shard_batch(coll.preprocess(*r)) for r in raw]
        shapes = [(64, 3, 16) if f.combiner == "none" else (64, 16) for f in features]
        rng = np.random.default_rng(0)
        grads = [
            {
                f.name: rng.standard_normal(s).astype(np.float32)
                for f, s in zip(features, shapes, strict=True)
            }
            for _ in raw
        ]
        results.append(_run(coll, batches, grads))
    (acts_f, got_f), (acts_x, got_x) = results
    for a, b in zip(acts_f, acts_x, strict=True):
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=2e-4, atol=1e-5, err_msg=name)
    for part in ("tables", "slots"):
        for leaf_f, leaf_x in zip(
            jax.tree.leaves(got_f[part]), jax.tree.leaves(got_x[part]), strict=True
        ):
            np.testing.assert_allclose(leaf_f, leaf_x, rtol=2e-4, atol=1e-5, err_msg=part)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16_bit_tables_match_xla_path(dtype, one):
    """Old row + delta rounded once to the table's dtype, as the XLA path does."""
    tables = [TableSpec(name="t", vocab_size=30, dim=8, optimizer=adam(0.05), dtype=dtype)]
    features = [FeatureSpec(name="f", table="t", max_ids=5, combiner="sum")]
    results = []
    for kernel in KERNELS:
        coll = _collection(tables, features, one, kernel)
        raw = [_dup_batch(features, np.random.default_rng(s), 32, 30) for s in range(2)]
        batches = [coll.shard_batch(coll.preprocess(*r)) for r in raw]
        rng = np.random.default_rng(1)
        grads = [{"f": rng.standard_normal((32, 8)).astype(np.float32)} for _ in raw]
        results.append(_run(coll, batches, grads))
    (acts_f, got_f), (acts_x, got_x) = results
    for a, b in zip(acts_f, acts_x, strict=True):
        np.testing.assert_allclose(a["f"], b["f"], rtol=1e-6, atol=1e-6)
    table_f = np.asarray(got_f["tables"]["t"], np.float32)
    table_x = np.asarray(got_x["tables"]["t"], np.float32)
    # a delta differing in its last float32 bits may round the other way: one 16-bit ulp
    np.testing.assert_allclose(table_f, table_x, rtol=1e-2, atol=1e-3)
    assert np.mean(table_f == table_x) > 0.99


def test_microbatched_update_equals_one_big_batch(one):
    """k micro-batches summed and applied once == one call on the concatenated batch
    (bit for bit: the kernel sums a row's entries in the same order); the step counter
    advances by one."""
    tables = [
        TableSpec(name="u", vocab_size=13, dim=8, optimizer=adam(0.1)),
        TableSpec(name="v", vocab_size=7, dim=8, optimizer=adam(0.1)),
    ]
    features = [
        FeatureSpec(name="a", table="u", max_ids=3, combiner="mean", weighted=True),
        FeatureSpec(name="b", table="v", max_ids=2, combiner="none"),
    ]
    coll = _collection(tables, features, one, "fused")
    k, micro = 3, 8
    hosts = [
        coll.preprocess(*oracle.random_batch(features, tables, micro, seed=i)) for i in range(k)
    ]
    stacked, flat = oracle.stacked_micro_batches(hosts)
    rng = np.random.default_rng(0)
    grads = {
        "a": rng.standard_normal((k, micro, 8)).astype(np.float32),
        "b": rng.standard_normal((k, micro, 2, 8)).astype(np.float32),
    }
    state = coll.state_from_logical(oracle.row_id_coded_tables(tables), step=4)
    apply = jax.jit(coll.apply_gradients, static_argnames="microbatched")
    accumulated = apply(state, coll.shard_batch(stacked, 1), grads, microbatched=True)
    flat_grads = {n: g.reshape(k * micro, *g.shape[2:]) for n, g in grads.items()}
    once = apply(state, coll.shard_batch(flat), flat_grads)
    assert int(accumulated["step"]) == int(once["step"]) == 5
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(once), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_donates_tables_and_compiles_once(one):
    """The update aliases the donated table and slots (no copy in the compiled step,
    same buffers after it) and later steps reuse the first compile."""
    tables = [
        TableSpec(name=f"t{i}", vocab_size=5000, dim=16, optimizer=rowwise_adagrad(0.1))
        for i in range(3)
    ]
    features = [FeatureSpec(name=f"f{i}", table=f"t{i}", max_ids=6) for i in range(3)]
    coll = _collection(tables, features, one, "fused")

    def step(state, batch):
        acts = coll.lookup(state["tables"], batch)
        grads = jax.grad(lambda a: sum(jnp.sum(v * v) for v in a.values()))(acts)
        return coll.apply_gradients(state, batch, grads)

    jitted = jax.jit(step, donate_argnums=0)
    state = coll.init(jax.random.key(0))
    batches = [
        coll.shard_batch(coll.preprocess(*oracle.random_batch(features, tables, 32, seed=s)))
        for s in range(3)
    ]
    text = jitted.lower(state, batches[0]).compile().as_text()
    table_shape = f"f32[1,{coll.groups[0].rows},16]"
    assert "lf_jax_update_adagrad" in text and "lf_jax_pool" in text
    assert not re.search(rf"= {re.escape(table_shape)}\S* (copy|fusion)\(", text)
    pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state["tables"])]
    with count_compilations() as counter:
        for batch in batches:
            state = jitted(state, batch)
            now = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state["tables"])]
            assert now == pointers
    assert counter.count <= 1
    assert int(state["step"]) == 3


def test_kernel_setting(monkeypatch, one):
    opt = rowwise_adagrad(0.1)
    assert fused.resolve_kernel("auto", "cpu", opt) == "fused"
    assert fused.resolve_kernel("auto", "gpu", opt) == "xla"
    assert fused.resolve_kernel("xla", "cpu", opt) == "xla"
    with pytest.raises(UserInputError, match="CPU kernel"):
        fused.resolve_kernel("fused", "gpu", opt)
    with pytest.raises(UserInputError, match="kernel must be one of"):
        fused.requested_kernel("fast")
    monkeypatch.setenv(fused.ENV, "xla")
    assert fused.requested_kernel(None) == "xla"
    tables = [TableSpec(name="t", vocab_size=5, dim=4, optimizer=opt)]
    features = [FeatureSpec(name="f", table="t", max_ids=1)]
    coll = EmbeddingCollection(tables, features, {"t": P.data_parallel()}, one)
    assert coll.kernel == "xla" and set(coll.kernels.values()) == {"xla"}
    monkeypatch.setenv(fused.ENV, "quick")
    with pytest.raises(UserInputError, match=fused.ENV):
        fused.requested_kernel(None)


def test_missing_compiler_names_the_xla_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "lf-jax-no-such-compiler")
    monkeypatch.setenv("LF_JAX_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(build.KernelBuildError, match="kernel='xla'"):
        build.load.__wrapped__()


def test_unwritable_kernel_cache_names_the_directory_and_the_setting(monkeypatch, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    monkeypatch.setenv("LF_JAX_KERNEL_CACHE", str(not_a_dir / "kernels"))
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    assert compiler is not None
    with pytest.raises(build.KernelBuildError, match="LF_JAX_KERNEL_CACHE") as caught:
        build.built_library(compiler)
    assert str(not_a_dir / "kernels") in str(caught.value)
    assert "kernel='xla'" in str(caught.value)
