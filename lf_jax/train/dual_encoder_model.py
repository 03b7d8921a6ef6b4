"""The dual encoder apart from its training: prompts, tokenizer, tiny Llama, ``embed``.

``DualEncoderModel.from_config`` reads the member_items entities, renders their prompts
with the config's templates (numeric features as percentile-bucket words), loads the
word-level tokenizer of the run (``workdir/tokenizer.json``; training creates it when
missing, export requires it) and builds the sharded DualEncoder. Training
(lf_jax/train/dual_encoder.py), export and serving share it.

Example:
    >>> encoder = DualEncoderModel.from_config(config, mesh, workdir)
    >>> ids, records = encoder.corpus("item")               # ["p0", ...], records
    >>> encoder.embed(state["params"], "item", records[:8]).shape   # (8, hidden_size)
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
from lf_jax.input.datasets import (
    build_dataset,
    dataset_metadata,
    open_built_dataset,
    read_records,
)
from lf_jax.input.text_pipeline import (
    PercentileBuckets,
    as_text,
    load_word_tokenizer,
    render_prompts,
    template_fields,
    tokenize,
    train_word_tokenizer,
)
from lf_jax.losses import l2_normalize
from lf_jax.models.causal_lm import LlamaConfig
from lf_jax.models.dual_encoder import DualEncoder
from lf_jax.models.encoder_sharding import shard_encoder

SIDES = ("member", "item")
TEXT_FIELDS = {"member": ("interests", "hashtags"), "item": ("text", "hashtags")}
TOKENIZER_FILE = "tokenizer.json"


def read_entities(builder, side: str) -> list[dict]:
    """Every record of split ``members`` / ``items``, ordered by id."""
    source = builder.as_data_source(f"{side}s")
    rows = read_records(source, range(len(source)))
    return sorted(rows, key=lambda row: int(row[f"{side}_id"]))


def matryoshka_dims(config) -> tuple[int, ...]:
    """``config.loss.matryoshka_dims``, checked to increase and end at the model width."""
    dims = tuple(int(d) for d in config.loss.matryoshka_dims)
    if not dims or list(dims) != sorted(set(dims)) or dims[-1] != config.model.hidden_size:
        raise UserInputError(
            f"config loss.matryoshka_dims={tuple(config.loss.matryoshka_dims)} must "
            f"increase and end at model.hidden_size={config.model.hidden_size}"
        )
    return dims


class DualEncoderModel:
    """Prompts, tokenizer and model of the dual encoder (see the module docstring)."""

    def __init__(self, config, mesh, workdir: str | Path, *, for_training: bool):
        """``for_training``: build the dataset and the tokenizer when missing; otherwise
        (export, serving) both must exist, and the dataset is read from its files
        without the builder code in data/."""
        c = self.config = config
        self.mesh = mesh
        self.builder = (build_dataset if for_training else open_built_dataset)(
            c.data.dataset, c.data.config, c.data.data_dir or None
        )
        self.meta = dataset_metadata(self.builder)
        self.dims = matryoshka_dims(c)
        self.data_size = int(mesh.shape.get("data", 1))
        self.entities = {side: read_entities(self.builder, side) for side in SIDES}
        self.buckets: dict[tuple[str, str], PercentileBuckets] = {}
        prompts = {side: self.render(side, self.entities[side], fit=True) for side in SIDES}
        path = Path(workdir) / TOKENIZER_FILE
        if path.exists():
            self.tokenizer = load_word_tokenizer(path)
        elif for_training:
            self.tokenizer = train_word_tokenizer(prompts["member"] + prompts["item"], path)
        else:
            raise UserInputError(f"'{path}' does not exist: train the dual encoder first")
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
        self.llama_config = LlamaConfig(
            vocab_size=-(-len(self.tokenizer) // 64) * 64,
            hidden_size=c.model.hidden_size,
            num_layers=c.model.num_layers,
            num_heads=c.model.num_heads,
            num_kv_heads=c.model.num_kv_heads,
            intermediate_size=c.model.intermediate_size,
            max_position_embeddings=c.data.max_length,
        )
        model = DualEncoder(self.llama_config, pooling=c.model.pooling, rngs=nnx.Rngs(c.seed))
        shard_encoder(model, mesh, c.model.sharding)
        self.graphdef, self.params = nnx.split(model)
        self._row_sharding = NamedSharding(mesh, PartitionSpec("data"))
        self._embed_step = jax.jit(
            lambda params, ids, mask: nnx.merge(self.graphdef, params).embed(ids, mask)
        )

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
            name: [as_text(row[f"{side}_{name}"]) for row in records]
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

    def corpus(self, side: str) -> tuple[list[str], list[dict]]:
        """(string ids "m<id>" / "p<id>", records) of every member or item, ordered by id."""
        if side not in SIDES:
            raise UserInputError(f"side={side!r} is not one of {SIDES}")
        return [as_text(row[f"{side}_key"]) for row in self.entities[side]], self.entities[side]

    def embed(
        self,
        params,
        side: str,
        records: Sequence[Mapping] | None = None,
        dim: int | None = None,
        batch_size: int = 256,
    ) -> np.ndarray:
        """Unit-norm float32 [N, dim] vectors (dim: a Matryoshka prefix, default full) of
        ``records`` (default: the whole corpus of ``side``) with the model ``params``."""
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
            out.append(np.asarray(self._embed_step(params, *placed))[:rows])
        vectors = np.concatenate(out)[:, :dim]
        return np.asarray(l2_normalize(jnp.asarray(vectors)))
