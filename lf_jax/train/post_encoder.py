"""The post encoder's TrainingTask: multi-task (text, post, label) pairs -> siamese BERT.

Starts from the pretrained MiniLM (``model.pretrained``) or a random BERT of the config's
size (tests). Each step, every data-parallel group draws its whole share of the batch from
one task, picked with ``data.task_proportions`` (task-heterogeneous sampling); the loss is
BCE on ``scale * cos(text, post) + bias``, its aux the mean loss of each task in the step
(0 for a task no group drew).

Evaluation, per task of the test split (the trained tasks and the zero-shot ``intent``):
the fraction of (anchor, positive, negative) triplets whose positive is closer, next to
the untuned MiniLM's (``<task>/minilm_triplet_acc``, computed once when
``eval.baseline``).

Export API: ``task.corpus("post") -> (string ids "t<i>", records)`` (the test split's
posts) and ``task.embed(state, "post" | "text", records=None) -> float32 [N, 50]``; records
are dicts with a "text" (side "text") or "post" (side "post") string.

Example:
    >>> task = PostEncoderTask(config, make_mesh(dict(config.mesh)), workdir)
    >>> metrics = run_training(task, config.train, workdir)
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
from lf_jax.input.datasets import build_dataset, dataset_metadata, read_records
from lf_jax.input.text_pipeline import StepSampler, as_text, task_mixture_indices
from lf_jax.losses import scaled_cosine_bce
from lf_jax.models.bert import BertConfig, BertEncoder
from lf_jax.models.encoder_sharding import shard_encoder
from lf_jax.models.post_encoder import PostEncoder
from lf_jax.models.sentence_encoder import load_sentence_encoder
from lf_jax.train.batch import check_micro_batches, place_batch
from lf_jax.train.step import dense_optimizer, init_train_state

SIDES = ("text", "post")


def triplet_accuracy(
    anchor_nd: np.ndarray, positive_nd: np.ndarray, negative_nd: np.ndarray
) -> float:
    """Fraction of rows whose positive has a higher cosine with the anchor than the negative."""

    def cos(a, b):
        return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)

    return float(np.mean(cos(anchor_nd, positive_nd) > cos(anchor_nd, negative_nd)))


class PostEncoderTask:
    """TrainingTask of the multi-task post encoder (see lf_jax.train.loop.TrainingTask)."""

    collection = None
    grad_cache = False

    def __init__(self, config, mesh, workdir: str | Path):
        self.config, self.mesh, self.workdir = config, mesh, Path(workdir)
        c = config
        self.builder = build_dataset(c.data.dataset, c.data.config, c.data.data_dir or None)
        self.meta = dataset_metadata(self.builder)
        self.tasks = tuple(self.meta["tasks"])
        self.aux_names = self.tasks
        proportions = tuple(c.data.task_proportions)
        if len(proportions) != len(self.tasks) or min(proportions) < 0 or sum(proportions) <= 0:
            raise UserInputError(
                f"config data.task_proportions={proportions} must be "
                f"{len(self.tasks)} non-negative numbers (tasks {self.tasks})"
            )
        self.proportions = proportions
        self.groups = int(mesh.shape.get("data", 1))
        self.num_micro = check_micro_batches(
            c.batch_size,
            c.train.grad_accum_steps,
            self.groups,
            f"the {self.groups} data groups (one per data shard)",
        )
        self.examples_per_step = c.batch_size
        if c.model.pretrained:
            sentence = load_sentence_encoder(c.model.pretrained)
            encoder, self.tokenizer = sentence.model, sentence.tokenizer
        else:
            sentence = load_sentence_encoder(c.model.tokenizer)
            self.tokenizer = sentence.tokenizer
            bert = BertConfig(
                vocab_size=self.tokenizer.vocab_size,
                hidden_size=c.model.hidden_size,
                num_layers=c.model.num_layers,
                num_heads=c.model.num_heads,
                intermediate_size=c.model.intermediate_size,
                max_position_embeddings=max(c.data.max_length, 64),
            )
            encoder = BertEncoder(bert, rngs=nnx.Rngs(c.seed))
        model = PostEncoder(
            encoder,
            projection_dim=c.model.projection_dim,
            init_scale=c.loss.init_scale,
            init_bias=c.loss.init_bias,
            rngs=nnx.Rngs(c.seed + 1),
        )
        shard_encoder(model, mesh, c.model.sharding)
        self.graphdef, self._params = nnx.split(model)
        self._load_pairs()
        self.tx = dense_optimizer(c.train)
        self._batch_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))
        self._row_sharding = NamedSharding(mesh, PartitionSpec("data"))
        self._embed_step = jax.jit(
            lambda p, ids, mask: nnx.merge(self.graphdef, p).embed(ids, mask)
        )
        self._baseline: dict[str, float] | None = None

    def _tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        out = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.config.data.max_length,
            return_tensors="np",
        )
        return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)

    def _load_pairs(self) -> None:
        source = self.builder.as_data_source("train")
        rows = read_records(source, range(len(source)))
        self.train = {}
        for task in self.tasks:
            mine = [row for row in rows if as_text(row["task"]) == task]
            if not mine:
                raise UserInputError(f"post_texts train split has no pairs of task {task!r}")
            text_ids, text_mask = self._tokens([as_text(row["text"]) for row in mine])
            post_ids, post_mask = self._tokens([as_text(row["post"]) for row in mine])
            self.train[task] = {
                "text_ids": text_ids,
                "text_mask": text_mask,
                "post_ids": post_ids,
                "post_mask": post_mask,
                "labels": np.asarray([row["label"] for row in mine], np.float32),
            }
        source = self.builder.as_data_source("test")
        self.test_rows = sorted(
            read_records(source, range(len(source))),
            key=lambda row: (as_text(row["task"]), as_text(row["text"])),
        )
        self.eval_tasks = tuple(dict.fromkeys(as_text(row["task"]) for row in self.test_rows))

    # ----- TrainingTask ----------------------------------------------------------------------
    def init_state(self) -> dict:
        return jax.jit(lambda p: init_train_state(p, self.tx, {}))(self._params)

    def loss_fn(self, model, activations, micro_batch):
        del activations
        text_bp = model.embed(micro_batch["text_ids"], micro_batch["text_mask"])
        post_bp = model.embed(micro_batch["post_ids"], micro_batch["post_mask"])
        losses_b = scaled_cosine_bce(
            text_bp, post_bp, micro_batch["labels"], model.logit_scale[...], model.logit_bias[...]
        )
        onehot_bt = jax.nn.one_hot(micro_batch["task"], len(self.tasks), dtype=losses_b.dtype)
        per_task_t = (losses_b @ onehot_bt) / jnp.maximum(onehot_bt.sum(0), 1.0)
        return jnp.mean(losses_b), per_task_t

    def _batch(self, rng: np.random.Generator, step: int) -> dict:
        b = self.config.batch_size // self.groups
        tasks_g, rows_gb = task_mixture_indices(
            rng,
            [len(self.train[t]["labels"]) for t in self.tasks],
            self.proportions,
            self.groups,
            b,
        )
        parts = []
        for task_index, rows in zip(tasks_g, rows_gb, strict=False):
            pairs = self.train[self.tasks[task_index]]
            parts.append(
                {
                    **{name: value[rows] for name, value in pairs.items()},
                    "task": np.full(b, task_index, np.int32),
                }
            )
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def train_iterator(self):
        return StepSampler(self._batch, self.config.data.seed)

    def device_batch(self, host: Mapping[str, np.ndarray]) -> dict:
        """[k, B/k, ...]: micro-batch m holds rows m*b/k.. of every group, group g's rows on data
        shard g."""
        return place_batch(
            host, self.num_micro, self._batch_sharding, rows="global", groups=self.groups
        )

    # ----- embedding and evaluation ---------------------------------------------------------
    def corpus(self, side: str = "post") -> tuple[list[str], list[dict]]:
        """(string ids "t<i>", records {"post": str}) of the test split's distinct posts."""
        if side != "post":
            raise UserInputError(f"side={side!r}: the post encoder's corpus is 'post'")
        posts = sorted(
            {as_text(row[name]) for row in self.test_rows for name in ("post", "negative_post")}
        )
        return [f"t{i}" for i in range(len(posts))], [{"post": text} for text in posts]

    def embed(
        self,
        state: Mapping,
        side: str,
        records: Sequence[Mapping] | None = None,
        batch_size: int = 128,
    ) -> np.ndarray:
        """float32 [N, projection_dim] unit vectors of ``records`` ({side: text} dicts; default
        the corpus of ``side``) with the trained ``state``."""
        if side not in SIDES:
            raise UserInputError(f"side={side!r} is not one of {SIDES}")
        if records is None:
            records = self.corpus(side)[1]
        return self.embed_texts(state, [as_text(row[side]) for row in records], batch_size)

    def embed_texts(
        self, state: Mapping, texts: Sequence[str], batch_size: int = 128
    ) -> np.ndarray:
        ids, mask = self._tokens(texts)
        batch_size = -(-batch_size // self.groups) * self.groups
        out = []
        for start in range(0, len(ids), batch_size):
            rows = len(ids[start : start + batch_size])
            pad = ((0, batch_size - rows), (0, 0))
            placed = [
                jax.device_put(np.pad(x[start : start + batch_size], pad), self._row_sharding)
                for x in (ids, mask)
            ]
            out.append(np.asarray(self._embed_step(state["params"], *placed))[:rows])
        return np.concatenate(out)

    def _triplet_texts(self, task: str) -> tuple[list[str], list[str], list[str]]:
        rows = [row for row in self.test_rows if as_text(row["task"]) == task]
        return tuple(
            [as_text(row[name]) for row in rows] for name in ("text", "post", "negative_post")
        )

    def baseline(self) -> dict[str, float]:
        """Triplet accuracy per task of the untuned pretrained sentence encoder (cached)."""
        if self._baseline is None:
            encoder = load_sentence_encoder(self.config.eval.baseline_model)
            self._baseline = {
                task: triplet_accuracy(
                    *(encoder.encode(texts, batch_size=128) for texts in self._triplet_texts(task))
                )
                for task in self.eval_tasks
            }
            get_logger().info(
                "untuned %s triplet accuracy: %s", self.config.eval.baseline_model, self._baseline
            )
        return self._baseline

    def evaluate(self, state: Mapping) -> dict[str, float]:
        metrics = {}
        for task in self.eval_tasks:
            anchor, positive, negative = (
                self.embed_texts(state, texts) for texts in self._triplet_texts(task)
            )
            metrics[f"{task}/triplet_acc"] = triplet_accuracy(anchor, positive, negative)
        if self.config.eval.baseline:
            metrics.update(
                {f"{task}/minilm_triplet_acc": acc for task, acc in self.baseline().items()}
            )
        return metrics
