"""The dual encoder's TrainingTask: member_items prompts -> tiny Llama -> Matryoshka InfoNCE.

The prompts, tokenizer (``workdir/tokenizer.json``, trained on the first start, reused on
resume) and model live in dual_encoder_model.py (``DualEncoderModel``, shared with export
and serving); this task adds the training pairs, the optimizer and the loss. The loss is InfoNCE
with in-batch negatives gathered across the
data axis, on every Matryoshka prefix; with ``train.grad_cache`` the k micro-batches of a
step are GradCache chunks, so every example is a negative of every other.

Evaluation: recall@10 of held-out member->item pairs over the whole item corpus (the
member's train items excluded), per Matryoshka dim, next to a popularity baseline.

``task.corpus(side) -> (string ids, records)`` and ``task.embed(state, side, records=None,
dim=None) -> float32 [N, dim]`` (unit rows) embed with a train state.

Example:
    >>> task = DualEncoderTask(config, make_mesh(dict(config.mesh)), workdir)
    >>> metrics = run_training(task, config.train, workdir)
    >>> ids, records = task.corpus("item"); vectors = task.embed(state, "item")
"""

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.errors import UserInputError
from lf_jax.input.datasets import read_records
from lf_jax.input.text_pipeline import StepSampler
from lf_jax.losses import l2_normalize, matryoshka_info_nce
from lf_jax.train.batch import check_micro_batches, place_batch
from lf_jax.train.dual_encoder_model import SIDES, DualEncoderModel, matryoshka_dims
from lf_jax.train.step import dense_optimizer, init_train_state


def read_pairs(builder, split: str) -> np.ndarray:
    source = builder.as_data_source(split)
    rows = read_records(source, range(len(source)))
    return np.asarray([(row["member_id"], row["item_id"]) for row in rows], np.int64)


def recall_at_k(
    scores_mn: np.ndarray, test_pairs: np.ndarray, train_pairs: np.ndarray, k: int = 10
) -> float:
    """Mean over members with test pairs of |top-k ∩ test items| / |test items|, ranking all
    items by score with the member's train items excluded."""
    scores_mn = np.array(scores_mn, np.float64, copy=True)
    scores_mn[train_pairs[:, 0], train_pairs[:, 1]] = -np.inf
    top_mk = np.argpartition(-scores_mn, k, axis=1)[:, :k]
    hit = np.zeros(scores_mn.shape, bool)
    np.put_along_axis(hit, top_mk, True, axis=1)
    members = np.unique(test_pairs[:, 0])
    hits_m = np.zeros(scores_mn.shape[0])
    np.add.at(hits_m, test_pairs[:, 0], hit[test_pairs[:, 0], test_pairs[:, 1]])
    counts_m = np.bincount(test_pairs[:, 0], minlength=scores_mn.shape[0])
    return float(np.mean(hits_m[members] / counts_m[members]))


class DualEncoderTask:
    """TrainingTask of the member/item dual encoder (see lf_jax.train.loop.TrainingTask)."""

    collection = None

    def __init__(self, config, mesh, workdir: str | Path):
        self.config, self.mesh, self.workdir = config, mesh, Path(workdir)
        c = config
        self.dims = matryoshka_dims(c)
        if not c.loss.temperature > 0:
            raise UserInputError(f"config loss.temperature={c.loss.temperature} must be > 0")
        self.data_size = int(mesh.shape.get("data", 1))
        self.num_micro = check_micro_batches(
            c.batch_size,
            c.train.grad_accum_steps,
            self.data_size,
            f"the data axis ({self.data_size})",
        )
        self.grad_cache = bool(c.train.grad_cache)
        self.aux_names = tuple(f"dim{d}" for d in self.dims)
        self.examples_per_step = c.batch_size
        self.encoder = DualEncoderModel(c, mesh, workdir, for_training=True)
        self.entities, self.tokens = self.encoder.entities, self.encoder.tokens
        self.train_pairs = read_pairs(self.encoder.builder, "train")
        self.test_pairs = read_pairs(self.encoder.builder, "test")
        self.graphdef, self._params = self.encoder.graphdef, self.encoder.params
        self.tx = dense_optimizer(c.train)
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))

    # ----- TrainingTask ----------------------------------------------------------------------
    def init_state(self) -> dict:
        return jax.jit(lambda p: init_train_state(p, self.tx, {}))(self._params)

    def embed_fn(self, model, micro_batch):
        return {
            side: model.embed(micro_batch[f"{side}_ids"], micro_batch[f"{side}_mask"])
            for side in SIDES
        }

    def contrastive_loss_fn(self, reps):
        c = self.config.loss
        return matryoshka_info_nce(
            reps["member"],
            reps["item"],
            self.dims,
            c.temperature,
            weights=tuple(c.matryoshka_weights) or None,
            symmetric=c.symmetric,
            mesh=self.mesh,
            axis="data",
        )

    def loss_fn(self, model, activations, micro_batch):
        """Per-micro-batch InfoNCE (used when train.grad_cache is false: negatives only from
        the same micro-batch)."""
        del activations
        return self.contrastive_loss_fn(self.embed_fn(model, micro_batch))

    def _batch(self, rng: np.random.Generator, step: int) -> dict:
        rows = rng.choice(len(self.train_pairs), self.config.batch_size, replace=False)
        pairs = self.train_pairs[rows]
        batch = {}
        for side, column in zip(SIDES, (0, 1), strict=False):
            ids, mask = self.tokens[side]
            batch[f"{side}_ids"], batch[f"{side}_mask"] = (
                ids[pairs[:, column]],
                mask[pairs[:, column]],
            )
        return batch

    def train_iterator(self):
        return StepSampler(self._batch, self.config.data.seed)

    def device_batch(self, host: Mapping[str, np.ndarray]) -> dict:
        """[k, B/k, L] arrays, examples split over the data axis."""
        return place_batch(host, self.num_micro, self._batch_sharding, rows="global")

    # ----- embedding and evaluation ---------------------------------------------------------
    def corpus(self, side: str) -> tuple[list[str], list[dict]]:
        """(string ids "m<id>" / "p<id>", records) of every member or item, ordered by id."""
        return self.encoder.corpus(side)

    def embed(self, state: Mapping, side: str, records=None, dim=None, batch_size=256):
        """``DualEncoderModel.embed`` with the trained ``state``: unit rows [N, dim]."""
        return self.encoder.embed(state["params"], side, records, dim, batch_size)

    def evaluate(self, state: Mapping) -> dict[str, float]:
        """recall@10 per Matryoshka dim and of the popularity baseline on the test pairs."""
        k = int(self.config.eval.recall_k)
        members, items = self.embed(state, "member"), self.embed(state, "item")
        metrics = {}
        for dim in self.dims:
            m, i = (
                l2_normalize(jnp.asarray(members[:, :dim])),
                l2_normalize(jnp.asarray(items[:, :dim])),
            )
            scores = np.asarray(m @ i.T)
            metrics[f"recall@{k}/dim{dim}"] = recall_at_k(
                scores, self.test_pairs, self.train_pairs, k
            )
        popularity = np.bincount(self.train_pairs[:, 1], minlength=len(items)).astype(np.float64)
        scores = np.broadcast_to(popularity, (len(members), len(items)))
        metrics[f"recall@{k}/popularity"] = recall_at_k(
            scores, self.test_pairs, self.train_pairs, k
        )
        return metrics
