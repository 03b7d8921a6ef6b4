"""Counting the collectives in a compiled XLA program.

``collective_counts(fn, *args)`` compiles ``fn`` (jit-wrapped if it is not already) for
``args`` and counts, in the optimized HLO text, the ops of each collective kind:

    all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute

What JAX 0.10.2 on the CPU backend emits (checked with shard_map on an 8-device mesh):
``all_gather`` -> ``all-gather``, ``psum_scatter`` -> ``reduce-scatter`` (kept as one op,
not decomposed into all-reduce + dynamic-slice), ``psum`` -> ``all-reduce``,
``all_to_all`` -> one tuple-shaped ``all-to-all``, ``ppermute`` -> ``collective-permute``.
CPU collectives are synchronous. Other backends differ, and this parser accepts them:

* asynchronous pairs (GPU/TPU): ``all-gather-start`` / ``all-gather-done``, likewise
  ``all-reduce-start`` and ``collective-permute-start``: the ``-start`` op is counted
  once, ``-done`` is not;
* ops wrapped by ``async-start(...), calls=%comp`` are counted inside ``%comp``;
* combined collectives (one op over a tuple of operands) count once;
* a backend that lowers reduce-scatter as all-reduce + dynamic-slice shows up as
  ``all-reduce``; compare ``counts["reduce-scatter"] + counts["all-reduce"]`` there.

Instruction names may contain the op name (``%all-to-all.3``, ``%all_gather.1``) and
metadata mentions ``all_gather``; only the opcode position (``<shape> opcode(``) counts.

Example:
    >>> counts = collective_counts(collection.lookup, state["tables"], batch)
    >>> counts
    {'all-gather': 3, 'reduce-scatter': 1, 'all-reduce': 0, 'all-to-all': 0,
     'collective-permute': 0}
"""

import dataclasses
import re
from collections.abc import Callable

import jax

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_OPCODE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op: its kind, the HLO line, and its replica groups' size (or None)."""

    kind: str
    line: str
    group_size: int | None


def compiled_text(fn: Callable, *args, **kwargs) -> str:
    """Optimized HLO text of ``fn`` (jit-wrapped if needed) compiled for ``args``."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    return jitted.lower(*args, **kwargs).compile().as_text()


def _group_size(line: str) -> int | None:
    listed = _GROUPS_LIST.search(line)
    if listed:
        return len(listed.group(1).split("}")[0].strip("{").split(","))
    iota = _GROUPS_IOTA.search(line)
    if iota:
        return int(iota.group(2))
    return None


def parse_collectives(hlo_text: str) -> list[Collective]:
    """Every collective op in an HLO text dump, in order (see module docstring)."""
    found = []
    for line in hlo_text.splitlines():
        if "=" not in line:
            continue
        match = _OPCODE.search(line.split("metadata=")[0])
        if match:
            found.append(Collective(match.group(1), line.strip(), _group_size(line)))
    return found


def count_collectives(hlo_text: str) -> dict[str, int]:
    """{kind: count} for every kind in COLLECTIVES (zeros included) of an HLO text."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for op in parse_collectives(hlo_text):
        counts[op.kind] += 1
    return counts


_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|f16|bf16|s32|u32|f32|s64|u64|f64)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}


def _result_bytes(line: str) -> list[int]:
    """Byte sizes of the result shapes of one HLO instruction line (tuple: each part)."""
    result = line.split("=", 1)[1]
    result = result[: _OPCODE.search(result).start()]
    sizes = []
    for dtype, dims in _SHAPE.findall(result):
        sizes.append(_count(dims) * _ITEMSIZE.get(dtype, 8 if dtype.endswith("64") else 4))
    return sizes


def _count(dims: str) -> int:
    """Elements of an HLO shape's dims ("8,64"; "" for a scalar)."""
    count = 1
    for dim in filter(None, dims.split(",")):
        count *= int(dim)
    return count


def received_bytes(op: Collective) -> int:
    """Bytes one device receives for ``op`` with ring algorithms over its replica group.

    all-gather / all-to-all: (S-1)/S of the result; reduce-scatter: (S-1) results;
    all-reduce: 2 (S-1)/S of the buffer; collective-permute: the result. An async
    ``-start`` op's tuple holds (operand, result): its last part counts. Ops inside a
    loop body count once.
    """
    sizes = _result_bytes(op.line)
    if not sizes:
        return 0
    size = sizes[-1] if "-start(" in op.line else sum(sizes)
    group = op.group_size or 1
    if op.kind in ("all-gather", "all-to-all"):
        return size * (group - 1) // group
    if op.kind == "reduce-scatter":
        return size * (group - 1)
    if op.kind == "all-reduce":
        return 2 * size * (group - 1) // group
    return size


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """{kind: bytes received per device} over the collectives of an HLO text."""
    totals = dict.fromkeys(COLLECTIVES, 0)
    for op in parse_collectives(hlo_text):
        totals[op.kind] += received_bytes(op)
    return totals


def collective_ops(fn: Callable, *args, **kwargs) -> list[Collective]:
    """The collective ops of ``fn`` compiled for ``args`` (kind, line, group size)."""
    return parse_collectives(compiled_text(fn, *args, **kwargs))


def collective_counts(fn: Callable, *args, **kwargs) -> dict[str, int]:
    """{kind: count} of the collectives of ``fn`` compiled for ``args``.

    ``fn`` may be a jitted function (its shardings and donation are kept) or a plain
    callable (wrapped in jax.jit). Compiles but does not run it.
    """
    return count_collectives(compiled_text(fn, *args, **kwargs))


_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION = re.compile(r"^(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\(")
_MOVES_DATA = {"parameter", "bitcast", "slice", "constant", "broadcast", "iota", "tuple"}


def _elements(shape: str) -> int:
    dims = _SHAPE.search(shape)
    return _count(dims.group(2)) if dims else 1


def all_to_all_overcounted_producers(hlo_text: str) -> list[str]:
    """Fusions feeding an all-to-all operand that compute on more elements than they
    output, as ``"fusion: opcode shape"`` lines.

    XLA:CPU splits an all-to-all's operand into one buffer per peer, and a fusion that
    produces one peer's slice may hold the whole operand's elementwise producer followed
    by a slice. It computes only the slice, but ``cost_analysis`` counts the whole
    producer once per peer (S x the operand's flops: the per-device flops grew with the
    device count). Data moves (parameters, bitcasts, slices, broadcasts) are not counted.
    """
    bodies: dict[str, list[tuple[str, str, str]]] = {}
    fusions: dict[str, tuple[str, str]] = {}  # instruction -> (result shape, computation)
    current = None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = bodies.setdefault(header.group(1), [])
            continue
        parsed = _INSTRUCTION.match(line.strip())
        if current is None or not parsed:
            continue
        name, shape, opcode = parsed.groups()
        current.append((name, shape, opcode))
        called = re.search(r"calls=%([\w.\-]+)", line)
        if opcode == "fusion" and called:
            fusions[name] = (shape, called.group(1))
    found = []
    for op in parse_collectives(hlo_text):
        if op.kind != "all-to-all":
            continue
        operands = op.line.split("all-to-all(", 1)[1].split("), ")[0]
        for operand in re.findall(r"%([\w.\-]+)", operands):
            if operand not in fusions:
                continue
            shape, computation = fusions[operand]
            found += [
                f"{operand}: {opcode} {inner}"
                for _, inner, opcode in bodies.get(computation, [])
                if opcode not in _MOVES_DATA and _elements(inner) > _elements(shape)
            ]
    return found
