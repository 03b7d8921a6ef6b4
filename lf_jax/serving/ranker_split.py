"""Which columns of the feed ranker's input x0 depend on the member, the post or the pair.

``Split.of(model, field_dims, member_fields=..., dense_groups=...)`` sorts the columns of
x0 = [gated fields, dots, dense] into three groups, member (M), post (P) and pair (X), and
gives each group's columns in the order the served pass (folded_ranker.py) holds them.

Example:
    >>> split = Split.of(ranker, {"member_id": 32, "actor_id": 32, "position": 8},
    ...                  member_fields=("member_id", "position"), dense_groups=("post",))
    >>> split.order["post"], split.width("pair"), split.perm
"""

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from lf_jax.models.ranker import FeedRanker

GROUPS = ("member", "post", "pair")


@dataclasses.dataclass(frozen=True)
class Split:
    """x0's columns by group, each group in its own order (see the module docstring).

    order[g]: the model's x0 column indices of group g, in the order the served pass holds
    them: member and post: their fields' blocks (model order), the dots among them, their
    dense columns; pair: the member x post dots per width as [post field, member field]
    (the einsum's order), then the pair dense columns. dense[g]: dense column indices of g.
    """

    field_dims: dict[str, int]
    member_fields: tuple[str, ...]
    post_fields: tuple[str, ...]
    order: dict[str, np.ndarray]
    dense: dict[str, np.ndarray]

    @classmethod
    def of(
        cls,
        model: FeedRanker,
        field_dims: Mapping[str, int],
        *,
        member_fields: Sequence[str],
        dense_groups: Sequence[str],
    ) -> "Split":
        if set(field_dims) != set(model.sparse_fields) or not set(member_fields) <= set(field_dims):
            raise ValueError(
                f"field_dims {sorted(field_dims)} must name the model's fields "
                f"{sorted(model.sparse_fields)}, member_fields {sorted(member_fields)} among them"
            )
        if len(dense_groups) != model.num_dense or set(dense_groups) - set(GROUPS):
            raise ValueError(
                f"dense_groups must give one of {GROUPS} for each of the model's "
                f"{model.num_dense} dense columns, got {list(dense_groups)}"
            )
        names = model.sparse_fields
        dims = [int(field_dims[n]) for n in names]
        starts = np.cumsum([0, *dims])
        group = ["member" if n in member_fields else "post" for n in names]
        # each group's fields: model order, grouped by width (stable), so that the fields
        # of one width are adjacent (the pair dots read them as one [.., F, D] block)
        fields = {
            g: sorted((i for i in range(len(names)) if group[i] == g), key=lambda i: dims[i])
            for g in ("member", "post")
        }
        order: dict[str, list[int]] = {g: [] for g in GROUPS}
        for g, members in fields.items():
            for i in members:
                order[g].extend(range(starts[i], starts[i + 1]))
        column = int(starts[-1])
        dot_column = {}
        if model.dot_interactions:
            for i in range(len(names)):
                for j in range(i + 1, len(names)):
                    if dims[i] == dims[j]:
                        dot_column[i, j] = dot_column[j, i] = column
                        column += 1
            for g, members in fields.items():  # as _pairwise enumerates the group's fields
                for a, i in enumerate(members):
                    order[g].extend(
                        dot_column[i, j] for j in members[a + 1 :] if dims[i] == dims[j]
                    )
            for width in sorted(set(dims)):
                posts = [i for i in fields["post"] if dims[i] == width]
                members = [i for i in fields["member"] if dims[i] == width]
                order["pair"].extend(dot_column[p, m] for p in posts for m in members)
        dense = {
            g: np.asarray([c for c, d in enumerate(dense_groups) if d == g], np.int32)
            for g in GROUPS
        }
        for g in GROUPS:
            order[g].extend(column + dense[g])
        return cls(
            field_dims=dict(zip(names, dims, strict=True)),
            member_fields=tuple(names[i] for i in fields["member"]),
            post_fields=tuple(names[i] for i in fields["post"]),
            order={g: np.asarray(v, np.int32) for g, v in order.items()},
            dense=dense,
        )

    @property
    def perm(self) -> np.ndarray:
        """[H]: x0's model column index at each position of the served order (M, P, X)."""
        return np.concatenate([self.order[g] for g in GROUPS])

    def width(self, group: str) -> int:
        return len(self.order[group])
