"""Table/feature specs and a hand plan from a config's ``embedding`` section.

The section looks like (a ConfigDict or plain dicts):

    embedding.tables.member = {vocab_size: 1_000_000, dim: 64, initializer: "normal",
                               optimizer: {kind: "rowwise_adagrad", learning_rate: 0.05}}
    embedding.features.actor_id = {table: "member", max_ids: 1, combiner: "sum",
                                   weighted: False}
    embedding.tables.post.dynamic = {eviction: "lru", probe_limit: 8, admit_after: 1,
                                     ttl_steps: 0, expected_keys: 1_000_000}
                                              # optional: a dynamic table (64-bit keys);
                                              # vocab_size is its row capacity
    embedding.plan = {}                       # or {"member": {"strategy": "row_wise", ...}}
    embedding.memory_budget_bytes = 2_000_000_000   # per device, read by the planner

Every error names the config key and the value, e.g.
``embedding.tables.member.vocab_size must be a positive int, got 0``.

Example:
    >>> tables, features, hand_plan = specs_from_config(config.embedding)
    >>> budget = memory_budget_from_config(config.embedding)
"""

from collections.abc import Mapping
from typing import Any

from lf_jax.checks import check_int
from lf_jax.embedding.dynamic.policy import DynamicPolicy
from lf_jax.embedding.plan import STRATEGIES
from lf_jax.embedding.sparse_optim import from_config as optimizer_from_config
from lf_jax.embedding.spec import (
    COMBINERS,
    DTYPES,
    INITIALIZERS,
    FeatureSpec,
    SpecError,
    TableSpec,
    validate_specs,
)
from lf_jax.errors import UserInputError

TABLE_KEYS = ("vocab_size", "dim", "initializer", "init_scale", "optimizer", "dtype", "dynamic")
# a table's ``dynamic`` section: the DynamicPolicy fields (ttl_steps 0: keys never expire)
# and ``expected_keys``, the distinct keys its traffic carries (0: unknown), which the
# plan turns into an expected occupancy (lf_jax.embedding.dynamic.report)
DYNAMIC_KEYS = (
    "probe_limit",
    "admit_after",
    "sketch_width",
    "sketch_depth",
    "eviction",
    "ttl_steps",
    "seed",
    "expected_keys",
)
FEATURE_KEYS = ("table", "max_ids", "combiner", "weighted", "oov_row", "truncate")


class EmbeddingConfigError(SpecError):
    """A value in the config's ``embedding`` section that cannot become a spec."""


def _plain(value: Any) -> Any:
    """ConfigDicts and mappings -> dicts, lists stay lists (recursively)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _section(config: Mapping, key: str, where: str, required: bool = True) -> dict:
    if key not in config or config[key] is None:
        if required:
            raise EmbeddingConfigError(f"{where}.{key} is missing (known keys: {sorted(config)})")
        return {}
    value = _plain(config[key])
    if not isinstance(value, dict):
        raise EmbeddingConfigError(f"{where}.{key} must be a section (dict), got {value!r}")
    return value


def _fields(values: Any, where: str, known: tuple[str, ...], required: tuple[str, ...]) -> dict:
    if not isinstance(values, dict):
        raise EmbeddingConfigError(f"{where} must be a dict of {known}, got {values!r}")
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise EmbeddingConfigError(
            f"{where}.{unknown[0]} is not a known key (known: {list(known)})"
        )
    missing = [key for key in required if key not in values]
    if missing:
        raise EmbeddingConfigError(f"{where}.{missing[0]} is missing")
    return values


def _check_values(
    values: dict, where: str, positive: tuple[str, ...], choices: dict[str, tuple[str, ...]]
) -> None:
    for key in positive:
        value = values.get(key, 1)
        check_int(f"{where}.{key}", value, EmbeddingConfigError)
    for key, allowed in choices.items():
        if key in values and values[key] not in allowed:
            raise EmbeddingConfigError(
                f"{where}.{key} must be one of {allowed}, got {values[key]!r}"
            )


def _table(name: str, values: Any, where: str) -> TableSpec:
    values = dict(_fields(values, where, TABLE_KEYS, ("vocab_size", "dim")))
    _check_values(
        values, where, ("vocab_size", "dim"), {"initializer": INITIALIZERS, "dtype": DTYPES}
    )
    if "optimizer" in values:
        options = values["optimizer"]
        if isinstance(options, str):
            options = {"kind": options}
        if not isinstance(options, dict) or "kind" not in options:
            raise EmbeddingConfigError(
                f"{where}.optimizer must be a dict with 'kind' and 'learning_rate', got {options!r}"
            )
        kwargs = {k: v for k, v in options.items() if k != "kind"}
        if "learning_rate" not in kwargs:
            raise EmbeddingConfigError(f"{where}.optimizer.learning_rate is missing")
        try:
            values["optimizer"] = optimizer_from_config(options["kind"], **kwargs)
        except TypeError as error:
            raise EmbeddingConfigError(f"{where}.optimizer {options!r}: {error}") from None
        except UserInputError as error:
            raise EmbeddingConfigError(f"{where}.optimizer: {error}") from None
    if "dynamic" in values:
        values["dynamic"] = _dynamic_policy(values["dynamic"], f"{where}.dynamic")
    try:
        return TableSpec(name=name, **values)
    except SpecError as error:
        raise EmbeddingConfigError(f"{where}: {error}") from None


def _dynamic_policy(values: Any, where: str) -> DynamicPolicy | None:
    """A table's ``dynamic`` section -> DynamicPolicy (None: the section is None)."""
    if values is None:
        return None
    values = dict(_fields(values, where, DYNAMIC_KEYS, ()))
    expected = values.pop("expected_keys", 0)
    check_int(f"{where}.expected_keys", expected, EmbeddingConfigError, minimum=0)
    if values.get("ttl_steps") == 0:
        values["ttl_steps"] = None  # documented: 0 keeps keys until they are evicted
    try:
        return DynamicPolicy(**values)
    except UserInputError as error:
        raise EmbeddingConfigError(f"{where}: {error}") from None


def dynamic_expected_keys(embedding: Mapping) -> dict[str, int]:
    """{table: expected_keys} of the config's dynamic tables (0: not given)."""
    tables = _section(embedding, "tables", "embedding")
    return {
        name: int(values["dynamic"].get("expected_keys", 0) or 0)
        for name, values in tables.items()
        if isinstance(values, dict) and isinstance(values.get("dynamic"), dict)
    }


def _feature(name: str, values: Any, where: str) -> FeatureSpec:
    values = _fields(values, where, FEATURE_KEYS, ("table",))
    _check_values(values, where, ("max_ids",), {"combiner": COMBINERS})
    try:
        return FeatureSpec(name=name, **values)
    except SpecError as error:
        raise EmbeddingConfigError(f"{where}: {error}") from None


def _hand_plan(plan: dict, table_names: list[str], where: str) -> dict[str, dict]:
    hand = {}
    for name, entry in plan.items():
        key = f"{where}.{name}"
        if name not in table_names:
            raise EmbeddingConfigError(f"{key} names no table (tables: {table_names})")
        if isinstance(entry, str):
            entry = {"strategy": entry}
        if not isinstance(entry, dict) or entry.get("strategy") not in STRATEGIES:
            got = entry.get("strategy") if isinstance(entry, dict) else entry
            raise EmbeddingConfigError(f"{key}.strategy must be one of {STRATEGIES}, got {got!r}")
        entry = dict(entry)
        if "axes" in entry and not isinstance(entry["axes"], str):
            entry["axes"] = tuple(entry["axes"])
        hand[name] = entry
    return hand


def specs_from_config(
    embedding: Mapping,
) -> tuple[list[TableSpec], list[FeatureSpec], dict[str, dict]]:
    """(tables, features, hand_plan) from an ``embedding`` config section.

    The hand plan holds only the tables ``embedding.plan`` names (possibly none);
    the planner fills in the rest.
    """
    where = "embedding"
    if not isinstance(embedding, Mapping) and not hasattr(embedding, "keys"):
        raise EmbeddingConfigError(f"{where} must be a section, got {embedding!r}")
    tables_cfg = _section(embedding, "tables", where)
    features_cfg = _section(embedding, "features", where)
    if not tables_cfg:
        raise EmbeddingConfigError(f"{where}.tables is empty; define at least one table")
    tables = [_table(name, values, f"{where}.tables.{name}") for name, values in tables_cfg.items()]
    features = [
        _feature(name, values, f"{where}.features.{name}") for name, values in features_cfg.items()
    ]
    names = [t.name for t in tables]
    for feature in features:
        if feature.table not in names:
            raise EmbeddingConfigError(
                f"{where}.features.{feature.name}.table {feature.table!r} "
                f"is not a table (tables: {names})"
            )
    validate_specs(tables, features)
    hand = _hand_plan(_section(embedding, "plan", where, required=False), names, f"{where}.plan")
    return tables, features, hand


def memory_budget_from_config(embedding: Mapping) -> int:
    """``embedding.memory_budget_bytes`` as a positive int (per device)."""
    value = embedding.get("memory_budget_bytes") if hasattr(embedding, "get") else None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_int(
        "embedding.memory_budget_bytes", value, EmbeddingConfigError, hint=" (bytes per device)"
    )
