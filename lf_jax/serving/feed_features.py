"""The serving features of the feed world: row layouts of the feature store and the ranker's
inputs computed from them.

A member row and a post row are float32 vectors (ids are stored exactly: every id is below
2**24). Member: activity, the member's latent vector, recent history (actors, hashtags,
-1 padded) and the tokenized prompt of the dual encoder (-1 past its end). Post: author,
root author, hashtags (-1 padded), follower counts of both authors, prior likes, log post
age and the two latent vectors the affinity features read (the author's, the mean of the
hashtags'). ``pair_inputs`` turns Q member rows and Q x K post rows into the feed ranker's
sparse ids and raw dense features per pair (the training-time ranker's inputs; numpy or
jax.numpy); the served ranker builds the same features per group instead: the member's
once per query (``member_inputs``), the posts' once per post (``post_inputs``,
``post_latents``) and the pair's per pair (``pair_dense``), see DENSE_GROUPS. Serving
ranks as if every candidate were shown first (position 0) and uses the noise-free
affinities (the logs add noise).

Shapes: Q queries, K candidates, W_m / W_p row widths, H history, T hashtags per post,
L prompt tokens, d latent dim.

Example:
    >>> layout = FeatureLayout(latent_dim=16, max_history=50, max_post_hashtags=5,
    ...                        prompt_length=40)
    >>> ids, dense = pair_inputs(np, layout, member_rows_qm, post_rows_qkp,
    ...                          member_table_rows_q, post_table_rows_qk)
    >>> ids["history_actors"].shape, dense.shape         # (Q*K, 50), (Q*K, 8)
"""

import dataclasses

import numpy as np

from lf_jax import feed_world
from lf_jax.errors import UserInputError

EXACT_ID_LIMIT = 1 << 24  # float32 holds every integer below this exactly


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureLayout:
    """Column layout of member and post rows (see the module docstring)."""

    latent_dim: int
    max_history: int
    max_post_hashtags: int
    prompt_length: int

    def member_columns(self) -> dict[str, tuple[int, int]]:
        """{field: (start, stop)} of a member row."""
        return _columns(
            [
                ("activity", 1),
                ("latent", self.latent_dim),
                ("history_actors", self.max_history),
                ("history_hashtags", self.max_history),
                ("prompt", self.prompt_length),
            ]
        )

    def post_columns(self) -> dict[str, tuple[int, int]]:
        """{field: (start, stop)} of a post row."""
        return _columns(
            [
                ("actor", 1),
                ("root_actor", 1),
                ("hashtags", self.max_post_hashtags),
                ("actor_followers", 1),
                ("root_followers", 1),
                ("prior_likes", 1),
                ("log_age", 1),
                ("actor_latent", self.latent_dim),
                ("hashtag_latent", self.latent_dim),
            ]
        )

    @property
    def member_width(self) -> int:
        return max(stop for _, stop in self.member_columns().values())

    @property
    def post_width(self) -> int:
        return max(stop for _, stop in self.post_columns().values())

    @property
    def width(self) -> int:
        """Row width of the store (member and post rows share one store, zero padded)."""
        return max(self.member_width, self.post_width)

    def to_json(self) -> dict:
        """Plain JSON values (lists, not tuples): equal to what json.loads gives back."""
        return {
            **dataclasses.asdict(self),
            "member_columns": {k: list(v) for k, v in self.member_columns().items()},
            "post_columns": {k: list(v) for k, v in self.post_columns().items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> "FeatureLayout":
        return cls(**{f.name: int(data[f.name]) for f in dataclasses.fields(cls)})


def _columns(fields: list[tuple[str, int]]) -> dict[str, tuple[int, int]]:
    out, start = {}, 0
    for name, width in fields:
        out[name] = (start, start + width)
        start += width
    return out


def _check_exact(name: str, values: np.ndarray) -> None:
    if values.size and int(np.max(values)) >= EXACT_ID_LIMIT:
        raise UserInputError(
            f"{name}: id {int(np.max(values))} is too large to store exactly in a float32 "
            f"feature row (limit {EXACT_ID_LIMIT - 1})"
        )


def member_rows(
    layout: FeatureLayout, world, members: np.ndarray, prompt_ids: np.ndarray, seed: int
) -> np.ndarray:
    """Member rows [n, W_m] for member ids [n]; ``prompt_ids`` [n, L] (-1 past the prompt).

    The history is the simulator's draw from a stream seeded by (seed, member), as the
    logs and ``FeedWorldFeatures`` draw it."""
    cols = layout.member_columns()
    out = np.zeros((len(members), layout.member_width), np.float32)
    hist_a = np.empty((len(members), layout.max_history), np.int64)
    hist_h = np.empty((len(members), layout.max_history), np.int64)
    for row, member in enumerate(members):
        rng = np.random.default_rng([seed, int(member)])
        actors, tags = feed_world.draw_histories(rng, world, np.array([member]), layout.max_history)
        hist_a[row], hist_h[row] = actors[0], tags[0]
    _check_exact("history ids", np.concatenate([hist_a.ravel(), hist_h.ravel()]))
    _check_exact("prompt ids", np.asarray(prompt_ids))
    values = {
        "activity": world.member_activity[members][:, None],
        "latent": world.member_vecs[members],
        "history_actors": hist_a,
        "history_hashtags": hist_h,
        "prompt": prompt_ids,
    }
    for name, (start, stop) in cols.items():
        out[:, start:stop] = values[name]
    return out


def post_rows(layout: FeatureLayout, world, posts: np.ndarray, seed: int) -> np.ndarray:
    """Post rows [n, W_p] for post ids [n]; the post age is drawn once per (seed, post)."""
    cols = layout.post_columns()
    actor, root = world.post_actor[posts], world.post_root_actor[posts]
    tags = world.post_hashtags[posts][:, : layout.max_post_hashtags]
    _check_exact("post author ids", np.concatenate([actor, root, tags.ravel()]))
    valid = tags >= 0
    tag_vecs = world.hashtag_vecs[np.maximum(tags, 0)] * valid[..., None]
    log_age = np.array(
        [np.log1p(np.random.default_rng([seed, 1, int(p)]).lognormal(2.5, 1.0)) for p in posts]
    )
    values = {
        "actor": actor[:, None],
        "root_actor": root[:, None],
        "hashtags": tags,
        "actor_followers": world.followers[actor][:, None],
        "root_followers": world.followers[root][:, None],
        "prior_likes": world.post_prior_likes[posts][:, None],
        "log_age": log_age[:, None],
        "actor_latent": world.member_vecs[actor],
        "hashtag_latent": tag_vecs.sum(1) / np.maximum(valid.sum(1), 1)[:, None],
    }
    out = np.zeros((len(posts), layout.post_width), np.float32)
    for name, (start, stop) in cols.items():
        out[:, start:stop] = values[name]
    return out


MEMBER_FEATURES = ("member_id", "position", "history_actors", "history_hashtags")
# what each of the ranker's 8 dense features depends on, in the order of pair_inputs:
# log1p actor followers, log1p root followers, log age, log1p 5 * activity, the two
# affinities (3 x member latent . author / hashtag latent), log1p prior likes, reshared
DENSE_GROUPS = ("post", "post", "post", "member", "pair", "pair", "post", "post")


def member_inputs(xp, layout: FeatureLayout, member_qm, member_table_q):
    """The member's sparse ids {feature: [Q, L]} (int32, -1 padded) and its dense
    features [Q, 1] (the "member" columns of DENSE_GROUPS) from member rows [Q, >=W_m]
    and member table rows [Q] (from the id map); served ranking is at position 0."""
    mc = layout.member_columns()
    hist_a, hist_h = mc["history_actors"], mc["history_hashtags"]
    start = mc["activity"][0]
    sparse = {
        "member_id": member_table_q[:, None].astype(xp.int32),
        "position": xp.zeros((member_qm.shape[0], 1), xp.int32),
        "history_actors": member_qm[:, hist_a[0] : hist_a[1]].astype(xp.int32),
        "history_hashtags": member_qm[:, hist_h[0] : hist_h[1]].astype(xp.int32),
    }
    return sparse, xp.log1p(5.0 * member_qm[:, start : start + 1]).astype(xp.float32)


def post_inputs(xp, layout: FeatureLayout, post_np, post_table_n):
    """The posts' sparse ids {feature: [N, L]} and dense features [N, 5] (the "post"
    columns of DENSE_GROUPS, in order) from post rows [N, >=W_p] and post table rows [N]."""
    pc = layout.post_columns()

    def col(name):
        start, stop = pc[name]
        return post_np[:, start:stop]

    actor, root = col("actor"), col("root_actor")
    dense = xp.concatenate(
        [
            xp.log1p(col("actor_followers")),
            xp.log1p(col("root_followers")),
            col("log_age"),
            xp.log1p(col("prior_likes")),
            (actor != root).astype(xp.float32),
        ],
        axis=-1,
    ).astype(xp.float32)
    sparse = {
        "actor_id": actor.astype(xp.int32),
        "root_actor_id": root.astype(xp.int32),
        "post_id": post_table_n[:, None].astype(xp.int32),
        "post_hashtags": col("hashtags").astype(xp.int32),
    }
    return sparse, dense


def post_latents(layout: FeatureLayout, post_np):
    """[N, 2d]: the author's and the hashtags' latent vectors of post rows [N, >=W_p]."""
    pc = layout.post_columns()
    return post_np[:, pc["actor_latent"][0] : pc["hashtag_latent"][1]]


def pair_dense(xp, layout: FeatureLayout, member_qm, latents_qkl):
    """The pair dense features [Q*K, 2] (the "pair" columns of DENSE_GROUPS): the member's
    affinity to each candidate's author and hashtags, from member rows [Q, >=W_m] and the
    candidates' ``post_latents`` [Q, K, 2d]."""
    q, k = latents_qkl.shape[:2]
    start, stop = layout.member_columns()["latent"]
    lat_qkad = latents_qkl.reshape(q, k, 2, stop - start)
    u_qd = member_qm[:, start:stop]
    return (3.0 * xp.einsum("qkad,qd->qka", lat_qkad, u_qd)).reshape(q * k, 2)


def assemble_dense(xp, parts: dict):
    """The dense features [B, 8] in DENSE_GROUPS order from {group: [B, d_group]}."""
    used = dict.fromkeys(parts, 0)
    columns = []
    for group in DENSE_GROUPS:
        columns.append(parts[group][:, used[group] : used[group] + 1])
        used[group] += 1
    return xp.concatenate(columns, axis=-1)


def pair_inputs(xp, layout: FeatureLayout, member_qm, post_qkp, member_table_q, post_table_qk):
    """Sparse ids {feature: [Q*K, L]} (int32, -1 padded) and raw dense features [Q*K, 8] of
    the Q x K (member, post) pairs, every feature per pair (the model's training-time
    inputs); ``xp`` is numpy or jax.numpy.

    member_qm [Q, >=W_m], post_qkp [Q, K, >=W_p] float32 rows; member_table_q [Q] and
    post_table_qk [Q, K] are the rows of the member and post id tables (from the id maps).
    """
    q, k = post_qkp.shape[:2]
    member_sparse, member_dense = member_inputs(xp, layout, member_qm, member_table_q)
    post_np = post_qkp.reshape(q * k, post_qkp.shape[-1])
    post_sparse, post_dense = post_inputs(xp, layout, post_np, post_table_qk.reshape(q * k))
    pair = pair_dense(xp, layout, member_qm, post_latents(layout, post_np).reshape(q, k, -1))
    dense = assemble_dense(
        xp, {"member": xp.repeat(member_dense, k, axis=0), "post": post_dense, "pair": pair}
    )
    sparse = {
        **{name: xp.repeat(v, k, axis=0) for name, v in member_sparse.items()},
        **post_sparse,
    }
    return sparse, dense.astype(xp.float32)


def layout_for(world_config, prompt_length: int) -> FeatureLayout:
    """The layout of a ``feed_world.SimConfig`` with prompts of ``prompt_length`` tokens."""
    return FeatureLayout(
        latent_dim=world_config.latent_dim,
        max_history=world_config.max_history,
        max_post_hashtags=world_config.max_post_hashtags,
        prompt_length=prompt_length,
    )
