"""EmbeddingCollection: specs + plan + mesh -> sharded tables with lookup and sparse update.

State is a plain pytree: {"tables": {group: [S, R, D]}, "slots": {group: {name: [S, R, ...]}},
"step": int32}. Lookups return activations; the dense model is differentiated w.r.t.
those activations, and ``apply_gradients`` turns activation gradients into a sparse
update of the touched rows only.

Example:
    >>> coll = EmbeddingCollection(tables, features, {"member": row_wise()}, mesh)
    >>> state = coll.init(jax.random.key(0))
    >>> batch = coll.shard_batch(coll.preprocess({"actor": [[3], [5]], ...}))
    >>> acts = coll.lookup(state["tables"], batch)              # {"actor": [B, D], ...}
    >>> loss, (g_dense, g_acts) = jax.value_and_grad(loss_fn, (0, 1))(dense, acts)
    >>> state = coll.apply_gradients(state, batch, g_acts)      # jit with donate_argnums=0
"""

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lf_jax.embedding import bag_exchange, ordering
from lf_jax.embedding import preprocess as preprocess_lib
from lf_jax.embedding.bag_exchange import BagLayout, exchange_modes
from lf_jax.embedding.buckets import Buckets
from lf_jax.embedding.capacity import checked_capacities, step_modes
from lf_jax.embedding.huge_pages import back_with_huge_pages
from lf_jax.embedding.kernels.fused import requested_kernel, resolve_kernel
from lf_jax.embedding.lookup import (
    GroupRoute,
    combiner_coefficients,
    group_forward,
    group_layout,
    group_routing,
)
from lf_jax.embedding.plan import validate_plan
from lf_jax.embedding.sharding.layout import Group, build_layout
from lf_jax.embedding.spec import FeatureSpec, TableSpec, initial_table, validate_specs
from lf_jax.embedding.stored_rows import logical_state, stored_state
from lf_jax.embedding.update import group_update
from lf_jax.errors import UserInputError

SparseBatch = preprocess_lib.SparseBatch


class EmbeddingCollection:
    """Tables, features and a plan laid over a mesh (see module docstring)."""

    def __init__(
        self,
        tables: Sequence[TableSpec],
        features: Sequence[FeatureSpec],
        plan: Mapping[str, Mapping],
        mesh: Mesh,
        id_fill: float = 1.0,
        kernel: str | None = None,
        exchange: str = "rows",
    ):
        """``id_fill``: the largest fraction of a device's padded id slots (examples x
        max_ids of each feature) that hold real ids, e.g. ``preprocess.id_fill(batches,
        num_devices)``; the owner exchange's static capacities are sized to it (1.0:
        to the padded slots). A batch above it is still exact (more exchange rounds).
        ``kernel``: auto | fused | xla, the path of each group's local sparse work
        (lf_jax.embedding.kernels.fused; None: $LF_JAX_EMBEDDING_KERNEL or auto = the
        fused C++ kernel on CPU, XLA on GPU / TPU); ``self.kernels`` shows each group's.
        ``exchange``: how groups whose rows are spread over every device of the mesh
        exchange with the owners: "rows" (keys out, rows back), "bags" (entries out,
        pooled partial bags back: lf_jax.embedding.bag_exchange, fused or XLA path) or
        "auto" (both offered on the fused kernels; the traffic picks per group,
        lf_jax.embedding.capacity.CapacityChooser; rows until it does)."""
        preprocess_lib.check_id_fill(id_fill)
        self.tables = validate_specs(tables, features)
        self.features = {feature.name: feature for feature in features}
        self.mesh = mesh
        self.plan = validate_plan(plan, self.tables, mesh)
        self.groups: list[Group] = build_layout(self.tables, self.plan, mesh)
        self.kernel = requested_kernel(kernel)
        platform = mesh.devices.flat[0].platform
        self.routes = []
        for group in self.groups:
            kernel_g = resolve_kernel(self.kernel, platform, group.optimizer)
            modes = exchange_modes(group, mesh, kernel_g, exchange)
            route = GroupRoute.build(group, self.features, float(id_fill), kernel_g, modes)
            self.routes.append(route)
        self.batch_axes = tuple(mesh.axis_names)
        self.num_devices = int(np.prod(list(mesh.shape.values())))

    @property
    def kernels(self) -> dict[str, str]:
        """Each shard group's local sparse path: 'fused' (C++ kernel) or 'xla'."""
        return {route.group.name: route.kernel for route in self.routes}

    # ----- shardings and state ------------------------------------------------------------
    def state_shardings(self) -> dict:
        """NamedShardings of the state pytree (for jit out_shardings and checkpoints)."""
        return {
            "tables": {g.name: g.sharding(self.mesh) for g in self.groups},
            "slots": {
                g.name: {
                    name: g.sharding(self.mesh, len(shape))
                    for name, shape in g.optimizer.slot_shapes(g.dim).items()
                }
                for g in self.groups
            },
            "step": NamedSharding(self.mesh, PartitionSpec()),
        }

    def init(self, key: jax.Array) -> dict:
        """Sharded state from each table's initializer; values do not depend on the plan.
        CPU tables and slots are backed by huge pages (lf_jax.embedding.huge_pages)."""

        def logical():
            return {name: initial_table(spec, key) for name, spec in self.tables.items()}

        state = jax.jit(
            lambda: self._state_from_logical(logical(), None, 0),
            out_shardings=self.state_shardings(),
        )()
        back_with_huge_pages((state["tables"], state["slots"]))
        return state

    def state_from_logical(
        self,
        tables: Mapping[str, np.ndarray],
        slots: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        step: int = 0,
    ) -> dict:
        """Sharded state from logical [vocab, dim] tables (+ optional slots), any plan;
        CPU tables and slots backed by huge pages as in ``init``."""
        for name, spec in self.tables.items():
            shape = np.shape(tables[name]) if name in tables else ()
            if shape != (spec.vocab_size, spec.dim):
                raise UserInputError(
                    f"table '{name}': expected logical shape "
                    f"{(spec.vocab_size, spec.dim)}, got {shape}"
                )

        def fn(t, s):
            return self._state_from_logical(t, s, step)

        state = jax.jit(fn, out_shardings=self.state_shardings())(dict(tables), slots)
        back_with_huge_pages((state["tables"], state["slots"]))
        return state

    def _state_from_logical(self, tables, slots, step) -> dict:
        return stored_state(self.mesh, self.groups, self.tables, tables, slots, step)

    def to_logical(self, state: Mapping) -> dict:
        """Jit-able logical form: {"tables": {name: [V, D]}, "slots": {name: {slot: [V, D]}},
        "step"} (``stored_rows.logical_state``: a row-wise slot is stored per column, so
        the per-piece accumulators of a column_wise table survive a checkpoint exactly)."""
        return logical_state(self.mesh, self.groups, self.tables, state)

    def from_logical(self, logical: Mapping) -> dict:
        """Jit-able inverse of to_logical: places logical tables/slots under this plan."""
        return self._state_from_logical(logical["tables"], logical.get("slots"), logical["step"])

    def logical_shardings(self) -> dict:
        """Shardings for the logical form: rows split over every device when they divide."""

        def rows(vocab, ndim):
            split = vocab % self.num_devices == 0
            return NamedSharding(
                self.mesh, PartitionSpec(self.batch_axes if split else None, *([None] * (ndim - 1)))
            )

        return {
            "tables": {n: rows(t.vocab_size, 2) for n, t in self.tables.items()},
            "slots": {
                n: {
                    name: rows(t.vocab_size, 2)  # every logical slot is [V, D]
                    for name in t.optimizer.slot_shapes(t.dim)
                }
                for n, t in self.tables.items()
                if t.optimizer.slot_shapes(t.dim)
            },
            "step": NamedSharding(self.mesh, PartitionSpec()),
        }

    def logical_tables(self, state: Mapping) -> dict[str, np.ndarray]:
        """Every table in its logical [vocab_size, dim] form, as numpy (gathers to host)."""
        return jax.device_get(self._jitted_to_logical(state)["tables"])

    def logical_slots(self, state: Mapping) -> dict[str, dict[str, np.ndarray]]:
        """Optimizer slots per table in logical [vocab, dim] form (see to_logical), as numpy."""
        return jax.device_get(self._jitted_to_logical(state)["slots"])

    @functools.cached_property
    def _jitted_to_logical(self):
        return jax.jit(self.to_logical)

    # ----- batches --------------------------------------------------------------------------
    def preprocess(self, raw_ids: Mapping, raw_weights: Mapping | None = None) -> SparseBatch:
        """Host-side validation and padding (see lf_jax.embedding.preprocess)."""
        return preprocess_lib.preprocess(self.features, self.tables, raw_ids, raw_weights)

    def batch_sharding(self, leading_dims: int = 0) -> NamedSharding:
        """Examples split over every mesh axis (after ``leading_dims`` unsplit axes)."""
        return NamedSharding(self.mesh, PartitionSpec(*([None] * leading_dims), self.batch_axes))

    def shard_batch(self, batch: SparseBatch, leading_dims: int = 0) -> SparseBatch:
        """Places a host batch on the mesh; the batch size must divide over the devices."""
        size = next(iter(batch.ids.values())).shape[leading_dims]
        if size % self.num_devices:
            raise UserInputError(
                f"batch size {size} does not divide over {self.num_devices} devices"
            )
        sharding = self.batch_sharding(leading_dims)
        return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)

    # ----- lookup and update ----------------------------------------------------------------
    def routing(
        self, batch: SparseBatch, capacities: Mapping[str, int] | Sequence | None = None
    ) -> dict[str, Buckets | BagLayout]:
        """The exchange layout (dedupe + owner buckets) of ``batch``'s ids for every group
        whose rows are spread over devices. Pass it to both ``lookup`` and
        ``apply_gradients`` of one step, and they build it once instead of twice
        (8 tables x 4096 x 20 ids on 8 CPU devices: ~12 CPU ms per device and step).
        ``capacities``: {group: keys per owner} (or its items, e.g.
        ``lf_jax.embedding.capacity.CapacityChooser.capacities()``), static; groups not
        named keep ``GroupRoute.capacity``. Any capacity is exact (more rounds when a
        batch overflows it); each layout's ``most`` says what would have fit. Groups in bag
        mode get their entries' BagLayout, capacities "<group>/entries" and
        "<group>/bags": a group whose default mode is bags (``exchange="bags"``), or an
        ``exchange="auto"`` group given those (``capacity.step_modes``).

        Example:
            >>> routing = coll.routing(batch)
            >>> acts = coll.lookup(state["tables"], batch, routing)
            >>> state = coll.apply_gradients(state, batch, g_acts, routing=routing)
        """
        given = checked_capacities(self, capacities)
        coefs = combiner_coefficients(self.features, batch)
        layouts: dict[str, Buckets | BagLayout] = {}
        modes = step_modes(self, given)
        for route in (r for r in self.routes if r.group.name in modes):
            slot_be, local_be, coef_be = route.entries(batch.ids, coefs)
            name = route.group.name
            if modes[name] == "rows":
                layouts[name] = group_layout(self.mesh, route, slot_be, local_be, given.get(name))
            else:  # bag mode: the entries' layout
                caps = (given.get(f"{name}/entries"), given.get(f"{name}/bags"))
                layouts[name] = bag_exchange.routing(
                    self.mesh, route, slot_be, local_be, coef_be, caps
                )
        return layouts

    def lookup(
        self,
        tables: Mapping[str, jax.Array],
        batch: SparseBatch,
        routing: Mapping[str, Buckets | BagLayout] | None = None,
    ) -> dict[str, jax.Array]:
        """Activations per feature: pooled [B, D] or sequence [B, max_ids, D] (float32).
        ``routing``: ``self.routing(batch)``, to share with ``apply_gradients``."""
        coefs = combiner_coefficients(self.features, batch)
        parts: dict[str, list] = {}
        entry_spec = PartitionSpec(self.batch_axes)
        layouts = {r.group.name: group_routing(routing, r) for r in self.routes if r.blocks}
        done = [(layout.most, entry_spec) for layout in layouts.values() if layout is not None]
        for route in self.routes:
            if not route.blocks:
                continue
            slot_be, local_be, coef_be = route.entries(batch.ids, coefs)
            if ordering.ordered() and done:  # this group's exchange after the previous phase's
                slot_be, local_be, coef_be = ordering.after(
                    self.mesh, done, slot_be, local_be, coef_be, spec=entry_spec
                )
            out_bcd = group_forward(
                self.mesh,
                route,
                tables[route.group.name],
                slot_be,
                local_be,
                coef_be,
                layouts[route.group.name],
            )
            done = [(out_bcd, entry_spec)]
            for block, value in route.split_output(out_bcd).items():
                parts.setdefault(block.feature, []).append((block.piece.col_start, value))
        return {
            name: jnp.concatenate([v for _, v in sorted(parts[name], key=lambda p: p[0])], axis=-1)
            for name in self.features
        }

    def apply_gradients(
        self,
        state: Mapping,
        batch: SparseBatch,
        activation_grads: Mapping,
        microbatched: bool = False,
        routing: Mapping[str, Buckets | BagLayout] | None = None,
    ) -> dict:
        """Sparse optimizer step from gradients w.r.t. the looked-up activations.

        With ``microbatched`` the batch and grads carry a leading axis of k micro-batches
        whose row gradients are summed and applied once (exact accumulation).
        ``routing``: ``self.routing(batch)`` as given to ``lookup`` (not micro-batched).
        """
        if microbatched and routing is not None:
            raise UserInputError(
                "routing is built per lookup batch; apply_gradients(microbatched=True) "
                "routes the k micro-batches together: pass routing=None"
            )
        preprocess_lib.check_activation_grads(self.features, self.tables, batch, activation_grads)
        if not microbatched:
            batch = jax.tree.map(lambda x: x[None], batch)
            activation_grads = jax.tree.map(lambda x: x[None], dict(activation_grads))
        coefs = combiner_coefficients(self.features, batch)
        step = state["step"] + 1
        tables, slots = dict(state["tables"]), dict(state["slots"])
        done: list = []
        for route in self.routes:
            if not route.blocks:
                continue
            name = route.group.name
            slot_kbe, local_kbe, coef_kbe = route.entries(batch.ids, coefs)
            grad_kbcd = route.join_gradients(activation_grads)
            if ordering.ordered() and done:  # this group's exchange after the previous group's
                slot_kbe, local_kbe, coef_kbe, grad_kbcd = ordering.after(
                    self.mesh,
                    done,
                    slot_kbe,
                    local_kbe,
                    coef_kbe,
                    grad_kbcd,
                    spec=PartitionSpec(None, self.batch_axes),
                )
            tables[name], slots[name] = group_update(
                self.mesh,
                route,
                tables[name],
                slots[name],
                slot_kbe,
                local_kbe,
                coef_kbe,
                grad_kbcd,
                step,
                layout=group_routing(routing, route),
            )
            done = [(tables[name], route.group.partition_spec(None, None))]
        return {"tables": tables, "slots": slots, "step": step}
