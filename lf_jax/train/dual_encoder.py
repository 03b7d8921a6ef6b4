"""The dual encoder's TrainingTask: member_items prompts -> tiny Llama -> Matryoshka InfoNCE.

Member and item prompts are rendered from the dataset's fields with the config's
templates (numeric features as percentile-bucket words), tokenised by a word-level
tokenizer trained on those prompts (``workdir/tokenizer.json``, reused on resume), and
embedded by one decoder. The loss is InfoNCE with in-batch negatives gathered across the
data axis, on every Matryoshka prefix; with ``train.grad_cache`` the k micro-batches of a
step are GradCache chunks, so every example is a negative of every other.

Evaluation: recall@10 of held-out member->item pairs over the whole item corpus (the
member's train items excluded), per Matryoshka dim, next to a popularity baseline.

Export API: ``task.corpus(side) -> (string ids, records)`` and
``task.embed(state, side, records=None, dim=None) -> float32 [N, dim]`` (unit rows).

Example:
    >>> task = DualEncoderTask(config, make_mesh(dict(config.mesh)), workdir)
    >>> metrics = run_training(task, config.train, workdir)
    >>> ids, records = task.corpus("item"); vectors = task.embed(state, "item")
"""

from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lf_jax.console import get_logger
from lf_jax.errors import UserInputError
from lf_jax.input.datasets import build_dataset, dataset_metadata
from lf_jax.input.text_pipeline import (
    PercentileBuckets,
    StepSampler,
    load_word_tokenizer,
    render_prompts,
    template_fields,
    tokenize,
    train_word_tokenizer,
)
from lf_jax.losses import l2_normalize, matryoshka_info_nce
from lf_jax.models.causal_lm import LlamaConfig
from lf_jax.models.dual_encoder import DualEncoder
from lf_jax.models.encoder_sharding import shard_encoder
from lf_jax.train.step import dense_optimizer, init_train_state

SIDES = ("member", "item")
TEXT_FIELDS = {"member": ("interests", "hashtags"), "item": ("text", "hashtags")}


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def read_entities(builder, side: str) -> list[dict]:
    """Every record of split ``members`` / ``items``, ordered by id."""
    source = builder.as_data_source(f"{side}s")
    rows = source.__getitems__(list(range(len(source))))
    return sorted(rows, key=lambda row: int(row[f"{side}_id"]))


def read_pairs(builder, split: str) -> np.ndarray:
    source = builder.as_data_source(split)
    rows = source.__getitems__(list(range(len(source))))
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
        self.builder = build_dataset(c.data.dataset, c.data.config, c.data.data_dir or None)
        self.meta = dataset_metadata(self.builder)
        self.dims = tuple(int(d) for d in c.loss.matryoshka_dims)
        if (
            not self.dims
            or list(self.dims) != sorted(set(self.dims))
            or self.dims[-1] != c.model.hidden_size
        ):
            raise UserInputError(
                f"config loss.matryoshka_dims={tuple(c.loss.matryoshka_dims)} must "
                f"increase and end at model.hidden_size={c.model.hidden_size}"
            )
        if not c.loss.temperature > 0:
            raise UserInputError(f"config loss.temperature={c.loss.temperature} must be > 0")
        self.data_size = int(mesh.shape.get("data", 1))
        self.num_micro = int(c.train.grad_accum_steps)
        if self.num_micro < 1 or c.batch_size % (self.num_micro * self.data_size):
            raise UserInputError(
                f"config batch_size={c.batch_size} must split into "
                f"train.grad_accum_steps={self.num_micro} micro-batches of a "
                f"multiple of the data axis ({self.data_size})"
            )
        self.grad_cache = bool(c.train.grad_cache)
        self.aux_names = tuple(f"dim{d}" for d in self.dims)
        self.examples_per_step = c.batch_size
        self.entities = {side: read_entities(self.builder, side) for side in SIDES}
        self.buckets, prompts = {}, {}
        for side in SIDES:
            prompts[side] = self.render(side, self.entities[side], fit=True)
        path = self.workdir / "tokenizer.json"
        self.tokenizer = (
            load_word_tokenizer(path)
            if path.exists()
            else train_word_tokenizer(prompts["member"] + prompts["item"], path)
        )
        self.tokens = {
            side: tokenize(self.tokenizer, prompts[side], c.data.max_length, eos=True)
            for side in SIDES
        }
        truncated = {side: float(np.mean(self.tokens[side][1][:, -1])) for side in SIDES}
        get_logger().info(
            "dual encoder: %d members, %d items, vocab %d, prompts truncated %s; e.g. %r",
            len(prompts["member"]),
            len(prompts["item"]),
            len(self.tokenizer),
            truncated,
            prompts["member"][0],
        )
        self.train_pairs = read_pairs(self.builder, "train")
        self.test_pairs = read_pairs(self.builder, "test")
        vocab = -(-len(self.tokenizer) // 64) * 64
        self.llama_config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=c.model.hidden_size,
            num_layers=c.model.num_layers,
            num_heads=c.model.num_heads,
            num_kv_heads=c.model.num_kv_heads,
            intermediate_size=c.model.intermediate_size,
            max_position_embeddings=c.data.max_length,
        )
        model = DualEncoder(self.llama_config, pooling=c.model.pooling, rngs=nnx.Rngs(c.seed))
        shard_encoder(model, mesh, c.model.sharding)
        self.graphdef, self._params = nnx.split(model)
        self.tx = dense_optimizer(c.train)
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
        self._row_sharding = NamedSharding(mesh, PartitionSpec("data"))
        self._embed_step = jax.jit(
            lambda params, ids, mask: nnx.merge(self.graphdef, params).embed(ids, mask)
        )

    # ----- prompts ---------------------------------------------------------------------------
    def render(self, side: str, records: Sequence[Mapping], fit: bool = False) -> list[str]:
        """Prompts of ``records`` with the config template of ``side``."""
        template = self.config.prompts[side]
        numeric_names = list(self.meta[f"{side}_numeric"])
        used = template_fields(template)
        numeric = {
            name: np.asarray([row[f"{side}_numeric"][i] for row in records], np.float64)
            for i, name in enumerate(numeric_names)
            if name in used
        }
        texts = {
            name: [_decode(row[f"{side}_{name}"]) for row in records]
            for name in TEXT_FIELDS[side]
            if name in used
        }
        unknown = [name for name in used if name not in numeric and name not in texts]
        if unknown:
            raise UserInputError(
                f"config prompts.{side}={template!r} names unknown field(s) {unknown} "
                f"(known: {list(TEXT_FIELDS[side]) + numeric_names})"
            )
        if fit:
            for name, values in numeric.items():
                self.buckets[(side, name)] = PercentileBuckets.fit(
                    values, self.config.prompts.num_buckets
                )
        return render_prompts(
            template, texts, numeric, {name: self.buckets[(side, name)] for name in numeric}
        )

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
        for side, column in zip(SIDES, (0, 1)):
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
        k = self.num_micro

        def place(x):
            x = np.asarray(x).reshape(k, x.shape[0] // k, *x.shape[1:])
            rows = x.shape[1] // jax.process_count()
            local = x[:, jax.process_index() * rows : (jax.process_index() + 1) * rows]
            return jax.make_array_from_process_local_data(self._batch_sharding, local, x.shape)

        return {name: place(value) for name, value in host.items()}

    # ----- embedding and evaluation ---------------------------------------------------------
    def corpus(self, side: str) -> tuple[list[str], list[dict]]:
        """(string ids "m<id>" / "p<id>", records) of every member or item, ordered by id."""
        if side not in SIDES:
            raise UserInputError(f"side={side!r} is not one of {SIDES}")
        return [_decode(row[f"{side}_key"]) for row in self.entities[side]], self.entities[side]

    def embed(
        self,
        state: Mapping,
        side: str,
        records: Sequence[Mapping] | None = None,
        dim: int | None = None,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Unit-norm float32 [N, dim] vectors (dim: a Matryoshka prefix, default full) of
        ``records`` (default: the whole corpus of ``side``) with the trained ``state``."""
        if side not in SIDES:
            raise UserInputError(f"side={side!r} is not one of {SIDES}")
        dim = self.dims[-1] if dim is None else dim
        if dim not in self.dims:
            raise UserInputError(f"dim={dim} is not one of the Matryoshka dims {self.dims}")
        ids, mask = (
            self.tokens[side]
            if records is None
            else tokenize(
                self.tokenizer, self.render(side, records), self.config.data.max_length, eos=True
            )
        )
        batch_size = -(-batch_size // self.data_size) * self.data_size
        out = []
        for start in range(0, len(ids), batch_size):
            chunk_ids, chunk_mask = (
                ids[start : start + batch_size],
                mask[start : start + batch_size],
            )
            rows = len(chunk_ids)
            pad = batch_size - rows
            chunk_ids = np.pad(chunk_ids, ((0, pad), (0, 0)))
            chunk_mask = np.pad(chunk_mask, ((0, pad), (0, 0)))
            placed = [jax.device_put(x, self._row_sharding) for x in (chunk_ids, chunk_mask)]
            out.append(np.asarray(self._embed_step(state["params"], *placed))[:rows])
        vectors = np.concatenate(out)[:, :dim]
        return np.asarray(l2_normalize(jnp.asarray(vectors)))

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
