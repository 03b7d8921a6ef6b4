"""Pure-numpy reference for the embedding engine: lookups and sparse optimizer steps.

The oracle works on *logical* tables ``{name: [vocab_size, dim]}`` and on the padded
batches the engine's preprocessing produces (ids [B, L] int, -1 for padding; weights
[B, L] float). It never looks at shard groups, so comparing it with
``EmbeddingCollection.logical_tables`` checks routing, combining and the sparse update
of every strategy at once. Everything is computed in float64.

Semantics it pins down (the engine's contract):

* Lookup: output = sum_l coef[b, l] * table[ids[b, l]] over valid ids (id >= 0), where
  coef = weight x combiner scale: 1 for ``sum``, 1 / sum_l(w) for ``mean``,
  1 / sqrt(sum_l w^2) for ``sqrtn`` (sums over the valid ids of the bag; an empty bag
  pools to zeros; weights are assumed >= 0); ``none`` keeps [B, L, D] with row
  l = w[b, l] * table[ids[b, l]].
* Step: the gradient w.r.t. a looked-up row is coef x the activation gradient of its
  output (pooled [B, D] or position l of a sequence); gradients of duplicate ids (within
  and across examples, across features sharing a table) are summed; only touched rows
  (rows with at least one valid id in the batch, even if the weight is 0) are updated:

  - ``sgd``: row -= lr * g
  - ``rowwise_adagrad``: acc += mean_d(g^2); row -= lr * g / (sqrt(acc) + eps). For a
    ``column_wise(n)`` table every column piece keeps its own accumulator over its own
    columns, so the oracle keeps ``accumulator`` as [V, n] for such tables (the engine's
    ``logical_slots`` reports the mean over pieces, see :func:`logical_slots`).
  - ``adam`` (lazy): mu = b1 mu + (1-b1) g; nu = b2 nu + (1-b2) g^2; bias correction
    with the 1-based global step of this update; row -= lr * mu_hat / (sqrt(nu_hat)+eps).

Example:
    >>> tables = row_id_coded_tables(table_specs)            # {"member": [V, D]}
    >>> slots = init_slots(table_specs, plan)
    >>> acts = oracle_lookup(features, tables, batch)          # {"actor": [B, D]}
    >>> tables, slots = oracle_step(tables, slots, features, table_specs, batch,
    ...                             activation_grads, step=1, plan=plan)
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

ROW_CODE_TABLE_STEP = 0.1
ROW_CODE_DIM_STEP = 0.001


# ----- inputs --------------------------------------------------------------------------------
def _by_name(specs) -> dict:
    if isinstance(specs, Mapping):
        return dict(specs)
    return {spec.name: spec for spec in specs}


def _ids_weights(batch) -> tuple[dict, dict]:
    """(ids, weights) as numpy from a SparseBatch, an (ids, weights) pair or a dict."""
    if isinstance(batch, Mapping):
        ids, weights = batch["ids"], batch["weights"]
    else:
        ids, weights = batch[0], batch[1]
    ids = {k: np.asarray(v) for k, v in ids.items()}
    weights = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    return ids, weights


def row_id_coded_tables(specs, dtype=np.float32) -> dict[str, np.ndarray]:
    """Tables whose values say where they came from: value[r, d] = r + t/10 + d/1000.

    ``t`` is the table's index in ``specs`` (mod 10). Any row that reaches the wrong
    example, position, column or table shows up as a wrong value. Exact in float32
    for vocab_size < 4096 and dim <= 100 (see :func:`decode_row_id_code`).

    Args:
        specs: sequence (or {name: spec}) of TableSpec.
    Returns:
        {name: [vocab_size, dim]} arrays of ``dtype``.

    Example:
        >>> row_id_coded_tables([TableSpec(name="a", vocab_size=3, dim=2)])["a"]
        array([[0.   , 0.001], [1.   , 1.001], [2.   , 2.001]], dtype=float32)
    """
    out = {}
    for index, spec in enumerate(_by_name(specs).values()):
        rows = np.arange(spec.vocab_size, dtype=np.float64)[:, None]
        cols = np.arange(spec.dim, dtype=np.float64)[None, :]
        out[spec.name] = (
            rows + (index % 10) * ROW_CODE_TABLE_STEP + cols * ROW_CODE_DIM_STEP
        ).astype(dtype)
    return out


def decode_row_id_code(value: float) -> tuple[int, int, int]:
    """(row, table index mod 10, column) of one value of :func:`row_id_coded_tables`."""
    row = int(np.floor(value + 1e-6))
    frac = value - row
    table = int(np.floor(frac / ROW_CODE_TABLE_STEP + 1e-3))
    col = int(round((frac - table * ROW_CODE_TABLE_STEP) / ROW_CODE_DIM_STEP))
    return row, table, col


def num_column_pieces(plan: Mapping | None, table: str) -> int:
    """Column pieces the plan cuts ``table`` into (``column_wise`` num_shards, else 1)."""
    entry = (plan or {}).get(table) or {}
    return int(entry.get("num_shards", 1)) if entry.get("strategy") == "column_wise" else 1


def init_slots(table_specs, plan: Mapping | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Fresh optimizer slots per table, in the oracle's form.

    sgd: {}; rowwise_adagrad: accumulator [V] ([V, n] for column_wise(n));
    adam: mu, nu [V, D] zeros.
    """
    slots = {}
    for name, spec in _by_name(table_specs).items():
        opt, vocab = spec.optimizer, spec.vocab_size
        if opt.kind == "rowwise_adagrad":
            pieces = num_column_pieces(plan, name)
            shape = (vocab,) if pieces == 1 else (vocab, pieces)
            slots[name] = {"accumulator": np.full(shape, opt.initial_accumulator, np.float64)}
        elif opt.kind == "adam":
            slots[name] = {"mu": np.zeros((vocab, spec.dim)), "nu": np.zeros((vocab, spec.dim))}
        elif opt.kind == "sgd":
            slots[name] = {}
        else:
            raise NotImplementedError(f"oracle has no optimizer '{opt.kind}'")
    return slots


def logical_slots(
    slots: Mapping[str, Mapping[str, np.ndarray]], dims: Mapping[str, int]
) -> dict[str, dict[str, np.ndarray]]:
    """Oracle slots -> the engine's ``logical_slots`` form: every slot [V, D] (``dims``:
    table -> D); a row-wise accumulator ([V], or [V, P] for P equal column pieces) is
    repeated over the columns of its piece.

    Tables without slots (sgd) are left out, as the engine leaves them out.
    """
    out = {}
    for name, table_slots in slots.items():
        if not table_slots:
            continue
        out[name] = {}
        for slot, value in table_slots.items():
            if slot == "accumulator":
                pieces_vp = value.reshape(value.shape[0], -1)
                value = np.repeat(pieces_vp, dims[name] // pieces_vp.shape[1], axis=1)
            out[name][slot] = value
    return out


# ----- lookup --------------------------------------------------------------------------------
def _coefs(feature, ids_bl: np.ndarray, weights_bl: np.ndarray) -> np.ndarray:
    """[B, L] coefficient of each id: weight x combiner scale, 0 for padding."""
    w = np.where(ids_bl >= 0, weights_bl, 0.0)
    if feature.combiner == "mean":
        total = w.sum(axis=-1, keepdims=True)
        w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    elif feature.combiner == "sqrtn":
        norm = np.sqrt((w * w).sum(axis=-1, keepdims=True))
        w = np.divide(w, norm, out=np.zeros_like(w), where=norm != 0)
    return w


def oracle_lookup(features, tables: Mapping[str, np.ndarray], batch) -> dict[str, np.ndarray]:
    """Reference activations: pooled [B, D] or sequence [B, L, D] (float64).

    Args:
        features: sequence (or {name: spec}) of FeatureSpec.
        tables: logical {table: [V, D]}.
        batch: SparseBatch (or (ids, weights)) with ids [B, L] (-1 pad) and weights [B, L].

    Example:
        >>> oracle_lookup([FeatureSpec(name="f", table="a", max_ids=2, combiner="mean")],
        ...               {"a": np.eye(3)}, ({"f": np.array([[0, 2]])}, {"f": np.ones((1, 2))}))
        {'f': array([[0.5, 0. , 0.5]])}
    """
    ids, weights = _ids_weights(batch)
    out = {}
    for name, feature in _by_name(features).items():
        ids_bl = ids[name]
        table = np.asarray(tables[feature.table], np.float64)
        coef_bl = _coefs(feature, ids_bl, weights[name])
        rows_bld = table[np.maximum(ids_bl, 0)] * coef_bl[..., None]
        out[name] = rows_bld if feature.combiner == "none" else rows_bld.sum(axis=-2)
    return out


# ----- sparse step ---------------------------------------------------------------------------
def row_gradients(
    features, table_specs, batch, activation_grads
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per table: (touched [V] bool, summed row gradients [V, D] float64).

    Row r is touched when some valid id of some feature reading the table equals r.
    """
    ids, weights = _ids_weights(batch)
    specs = _by_name(table_specs)
    out = {
        name: (np.zeros(spec.vocab_size, bool), np.zeros((spec.vocab_size, spec.dim)))
        for name, spec in specs.items()
    }
    for name, feature in _by_name(features).items():
        ids_bl = ids[name]
        coef_bl = _coefs(feature, ids_bl, weights[name])
        grad = np.asarray(activation_grads[name], np.float64)
        grad_bld = (
            grad
            if feature.combiner == "none"
            else np.broadcast_to(grad[:, None, :], (*ids_bl.shape, grad.shape[-1]))
        )
        valid = ids_bl >= 0
        touched, grads_vd = out[feature.table]
        touched[ids_bl[valid]] = True
        np.add.at(grads_vd, ids_bl[valid], (coef_bl[..., None] * grad_bld)[valid])
    return out


def _update_rows(opt, rows_ud, grads_ud, slots: dict, step: int, pieces: int):
    """Applies one optimizer to touched rows [U, D]; slots hold the rows' [U, ...] values."""
    if opt.kind == "sgd":
        return rows_ud - opt.learning_rate * grads_ud, {}
    if opt.kind == "rowwise_adagrad":
        acc = slots["accumulator"]
        acc_up = acc.reshape(acc.shape[0], -1)  # [U, pieces]
        g_upw = grads_ud.reshape(grads_ud.shape[0], pieces, -1)  # [U, pieces, D/pieces]
        acc_up = acc_up + np.mean(g_upw**2, axis=-1)
        scale_up = opt.learning_rate / (np.sqrt(acc_up) + opt.eps)
        new_rows = rows_ud - (scale_up[..., None] * g_upw).reshape(rows_ud.shape)
        return new_rows, {"accumulator": acc_up.reshape(acc.shape)}
    if opt.kind == "adam":
        mu = opt.b1 * slots["mu"] + (1 - opt.b1) * grads_ud
        nu = opt.b2 * slots["nu"] + (1 - opt.b2) * grads_ud**2
        mu_hat = mu / (1 - opt.b1**step)
        nu_hat = nu / (1 - opt.b2**step)
        return rows_ud - opt.learning_rate * mu_hat / (np.sqrt(nu_hat) + opt.eps), {
            "mu": mu,
            "nu": nu,
        }
    raise NotImplementedError(f"oracle has no optimizer '{opt.kind}'")


def oracle_step(
    tables: Mapping[str, np.ndarray],
    slots: Mapping[str, Mapping[str, np.ndarray]],
    features,
    table_specs,
    batch,
    activation_grads: Mapping[str, Any],
    step: int,
    plan: Mapping | None = None,
) -> tuple[dict, dict]:
    """One sparse optimizer step on logical tables; returns (new tables, new slots).

    Args:
        tables: logical {table: [V, D]} (not modified).
        slots: oracle slots, as from :func:`init_slots` (not modified).
        features / table_specs: FeatureSpec / TableSpec sequences (or dicts by name).
        batch: SparseBatch (or (ids, weights)), ids [B, L] with -1 padding.
        activation_grads: {feature: [B, D] pooled or [B, L, D] sequence}.
        step: the 1-based global step of this update (the engine's state["step"] after
            it), used by Adam's bias correction.
        plan: the sharding plan; only ``column_wise`` entries matter (per-piece Adagrad).

    Example:
        >>> tables, slots = oracle_step(tables, slots, features, specs, batch, grads, 1, plan)
    """
    specs = _by_name(table_specs)
    new_tables = {name: np.asarray(value, np.float64).copy() for name, value in tables.items()}
    new_slots = {
        name: {k: np.asarray(v, np.float64).copy() for k, v in s.items()}
        for name, s in slots.items()
    }
    for name, (touched, grads_vd) in row_gradients(
        features, specs, batch, activation_grads
    ).items():
        rows = np.nonzero(touched)[0]
        if not rows.size:
            continue
        spec = specs[name]
        table_slots = new_slots.get(name, {})
        updated, slot_rows = _update_rows(
            spec.optimizer,
            new_tables[name][rows],
            grads_vd[rows],
            {k: v[rows] for k, v in table_slots.items()},
            step,
            num_column_pieces(plan, name),
        )
        new_tables[name][rows] = updated
        for key, value in slot_rows.items():
            table_slots[key][rows] = value
    return new_tables, new_slots


# ----- inputs for tests and notebooks --------------------------------------------------------
def random_batch(
    features,
    table_specs,
    batch_size: int,
    seed: int = 0,
    empty_every: int = 5,
    zero_weight_prob: float = 0.1,
) -> tuple[dict[str, list], dict[str, list]]:
    """Ragged raw ids (+ weights for weighted features) that stress the engine.

    Bags have 0..max_ids ids (every ``empty_every``-th example is empty), ids come from
    the whole vocabulary (small vocabularies give duplicates across examples), about
    half the bags of 2+ ids repeat their first id, the last example reads the last row
    (the padded end of a row-wise shard), and weights are in [0.25, 2) with some zeros.

    Returns:
        (raw_ids, raw_weights): {feature: list of B lists}, the input of ``preprocess``.

    Example:
        >>> raw_ids, raw_weights = random_batch(features, tables, batch_size=16, seed=1)
        >>> batch = collection.preprocess(raw_ids, raw_weights)
    """
    rng = np.random.default_rng(seed)
    specs = _by_name(table_specs)
    raw_ids, raw_weights = {}, {}
    for name, feature in _by_name(features).items():
        vocab = specs[feature.table].vocab_size
        bags = []
        for example in range(batch_size):
            size = 0 if example % empty_every == 0 else int(rng.integers(1, feature.max_ids + 1))
            bag = rng.integers(0, vocab, size)
            if size >= 2 and rng.random() < 0.5:
                bag[1] = bag[0]
            if example == batch_size - 1 and size:
                bag[0] = vocab - 1
            bags.append([int(i) for i in bag])
        raw_ids[name] = bags
        if feature.weighted:
            raw_weights[name] = [
                [
                    0.0 if rng.random() < zero_weight_prob else float(rng.uniform(0.25, 2.0))
                    for _ in bag
                ]
                for bag in bags
            ]
    return raw_ids, raw_weights


def stacked_micro_batches(hosts) -> tuple[Any, Any]:
    """(stacked, flat) of k host SparseBatches of b examples: ids / weights [k, b, L]
    (the micro-batched form ``apply_gradients(microbatched=True)`` takes) and the same
    examples as one batch [k * b, L] (the big batch it must equal)."""
    from lf_jax.embedding.preprocess import SparseBatch

    names = hosts[0].ids
    stacked = SparseBatch(
        {n: np.stack([h.ids[n] for h in hosts]) for n in names},
        {n: np.stack([h.weights[n] for h in hosts]) for n in names},
    )
    k, b = len(hosts), next(iter(stacked.ids.values())).shape[1]
    flat = SparseBatch(
        {n: x.reshape(k * b, -1) for n, x in stacked.ids.items()},
        {n: x.reshape(k * b, -1) for n, x in stacked.weights.items()},
    )
    return stacked, flat
