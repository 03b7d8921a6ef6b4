"""Hugging Face checkpoints on local disk -> NNX models, without torch.

Reads ``config.json`` and ``model.safetensors`` (or a sharded checkpoint with
``model.safetensors.index.json``) as numpy, and fills a model built abstractly with
``nnx.eval_shape``, so no random initialisation is spent on weights about to be
replaced. The name maps of both encoders (``bert_arrays_from_hf`` for BertEncoder,
``llama_arrays_from_hf`` for LlamaModel) live here too: HF names, transposes of the
torch [out, in] weights and head reshapes in one place. Every problem (missing file,
missing tensor, wrong shape, a tensor the architecture lacks) is one UserInputError
naming the file, the tensor and the shapes.

Example:
    >>> tensors = read_safetensors(model_dir)              # {"encoder.layer.0...": array}
    >>> model = build_with_arrays(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)),
    ...                           {("layers", 0, "q_kernel"): q_dhk, ...}, source=model_dir)
"""

import json
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lf_jax.checks import check_int
from lf_jax.errors import UserInputError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_json(path: str, *, what: str) -> dict:
    """A JSON object from ``path``; missing or malformed -> UserInputError naming it."""
    if not os.path.isfile(path):
        raise UserInputError(f"{what}: no file at {path!r}")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as err:
        raise UserInputError(f"{what}: cannot read {path!r} as JSON ({err})") from err
    if not isinstance(data, dict):
        raise UserInputError(f"{what}: {path!r} holds a {type(data).__name__}, not an object")
    return data


def require_int(data: Mapping, key: str, path: str, *, default=None, minimum: int = 1) -> int:
    """``data[key]`` as a positive int, else UserInputError naming the file, key and value."""
    value = data.get(key, default)
    return check_int(f"{path}: field '{key}'", value, minimum=minimum)


def require_float(data: Mapping, key: str, path: str, *, default=None) -> float:
    """``data[key]`` as a positive float, else UserInputError naming the file, key and value."""
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UserInputError(f"{path}: field '{key}' must be a positive number, got {value!r}")
    return float(value)


def read_safetensors(model_dir: str) -> dict[str, np.ndarray]:
    """All tensors of a local checkpoint as numpy arrays, keyed by their HF names."""
    from safetensors import SafetensorError, safe_open

    single = os.path.join(model_dir, SAFETENSORS)
    index = os.path.join(model_dir, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        weight_map = read_json(index, what="sharded checkpoint index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserInputError(f"{index}: field 'weight_map' is missing or empty")
        files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    else:
        raise UserInputError(
            f"model directory {model_dir!r} has neither {SAFETENSORS} nor {SAFETENSORS_INDEX}"
        )
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        if not os.path.isfile(path):
            raise UserInputError(f"checkpoint file {path!r} is missing")
        try:
            with safe_open(path, framework="np") as handle:
                for name in handle.keys():
                    tensors[name] = handle.get_tensor(name)
        except (OSError, ValueError, SafetensorError) as err:
            raise UserInputError(f"cannot read safetensors file {path!r}: {err}") from err
    return tensors


def strip_prefix(tensors: Mapping[str, np.ndarray], prefixes: tuple[str, ...]) -> dict:
    """Drops the first of ``prefixes`` that every name in a group starts with.

    HF saves ``BertModel`` weights bare ("encoder.layer.0...") and ``BertForX`` weights
    under "bert."; ``LlamaForCausalLM`` under "model.". Names without the prefix (e.g.
    "lm_head.weight") are kept as they are.
    """
    for prefix in prefixes:
        if any(name.startswith(prefix) for name in tensors):
            return {
                name[len(prefix) :] if name.startswith(prefix) else name: value
                for name, value in tensors.items()
            }
    return dict(tensors)


class TensorSource:
    """Takes tensors by name from a checkpoint, checking shapes; remembers what was used."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """The tensor ``name`` with exactly ``shape``; otherwise a UserInputError."""
        if name not in self.tensors:
            close = sorted(key for key in self.tensors if key.split(".")[-1] == name.split(".")[-1])
            raise UserInputError(
                f"checkpoint {self.source!r} has no tensor '{name}' "
                f"(tensors ending alike: {close[:4]})"
            )
        value = self.tensors[name]
        if tuple(value.shape) != tuple(shape):
            raise UserInputError(
                f"checkpoint {self.source!r}: tensor '{name}' has shape "
                f"{tuple(value.shape)} but config.json implies {tuple(shape)}"
            )
        self.used.add(name)
        return value

    def unused(self, ignore: Callable[[str], bool] = lambda name: False) -> list[str]:
        """Names never taken, except those ``ignore`` accepts (buffers, heads)."""
        return sorted(name for name in self.tensors if name not in self.used and not ignore(name))


def build_with_arrays(
    make_model: Callable[[], nnx.Module],
    arrays: Mapping[tuple, np.ndarray],
    *,
    source: str,
    place: Callable[[nnx.Module], nnx.State] | None = None,
) -> nnx.Module:
    """Builds ``make_model()`` abstractly and fills every Param from ``arrays``.

    ``arrays`` maps each NNX state path (e.g. ``("layers", 0, "q_kernel")``) to a numpy
    array of the abstract parameter's shape; values are cast to the parameter dtype.
    ``place(abstract_model)`` may give a NamedSharding per parameter (e.g.
    ``encoder_shardings``); each value then goes from host memory straight to its shards.
    A path the model lacks, or a parameter left without a value, is a bug in the
    caller's name mapping and raises ValueError; a shape mismatch is UserInputError.
    """
    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_state = nnx.split(abstract_model)
    targets = dict(nnx.to_flat_state(place(abstract_model))) if place is not None else {}
    filled = []
    expected = set()
    for path, variable in nnx.to_flat_state(abstract_state):
        expected.add(path)
        abstract = variable.get_value()
        if path not in arrays:
            raise ValueError(f"no checkpoint value mapped to parameter {path} of the model")
        value = np.asarray(arrays[path])
        if tuple(value.shape) != tuple(abstract.shape):
            raise UserInputError(
                f"checkpoint {source!r}: value for {'.'.join(map(str, path))} "
                f"has shape {value.shape}, the model wants {abstract.shape}"
            )
        value = value.astype(abstract.dtype)
        placed = (
            jax.device_put(value, targets[path].get_value())
            if path in targets
            else jnp.asarray(value)
        )
        filled.append((path, variable.replace(value=placed)))
    extra = sorted(set(arrays) - expected)
    if extra:
        raise ValueError(f"checkpoint values mapped to paths the model lacks: {extra[:4]}")
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# --- name maps: HF tensor names -> NNX paths of lf_jax's encoders -----------------------


def _hf_name_alias(tensors: dict, name: str) -> str:
    """Old TF-converted checkpoints call LayerNorm weight/bias gamma/beta."""
    if name in tensors:
        return name
    legacy = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta"
    )
    return legacy if legacy in tensors else name


def bert_arrays_from_hf(tensors: dict, config, source: str) -> dict:
    """HF ``BertModel`` tensors ("bert." stripped) -> {NNX path: array}; config: BertConfig."""
    c, d, h, k = config, config.hidden_size, config.num_heads, config.head_dim
    src = TensorSource(tensors, source)

    def take(name, shape):
        return src.take(_hf_name_alias(tensors, name), shape)

    arrays = {
        ("word_embeddings",): take("embeddings.word_embeddings.weight", (c.vocab_size, d)),
        ("position_embeddings",): take(
            "embeddings.position_embeddings.weight", (c.max_position_embeddings, d)
        ),
        ("token_type_embeddings",): take(
            "embeddings.token_type_embeddings.weight", (c.type_vocab_size, d)
        ),
        ("emb_ln_scale",): take("embeddings.LayerNorm.weight", (d,)),
        ("emb_ln_bias",): take("embeddings.LayerNorm.bias", (d,)),
    }
    for i in range(c.num_layers):
        pre = f"encoder.layer.{i}."
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            weight = take(f"{pre}attention.self.{theirs}.weight", (d, d))
            arrays[("layers", i, f"{ours}_kernel")] = weight.T.reshape(d, h, k)
            arrays[("layers", i, f"{ours}_bias")] = take(
                f"{pre}attention.self.{theirs}.bias", (d,)
            ).reshape(h, k)
        arrays[("layers", i, "o_kernel")] = take(
            f"{pre}attention.output.dense.weight", (d, d)
        ).T.reshape(h, k, d)
        arrays[("layers", i, "o_bias")] = take(f"{pre}attention.output.dense.bias", (d,))
        arrays[("layers", i, "attn_ln_scale")] = take(
            f"{pre}attention.output.LayerNorm.weight", (d,)
        )
        arrays[("layers", i, "attn_ln_bias")] = take(f"{pre}attention.output.LayerNorm.bias", (d,))
        arrays[("layers", i, "mlp_in_kernel")] = take(
            f"{pre}intermediate.dense.weight", (c.intermediate_size, d)
        ).T
        arrays[("layers", i, "mlp_in_bias")] = take(
            f"{pre}intermediate.dense.bias", (c.intermediate_size,)
        )
        arrays[("layers", i, "mlp_out_kernel")] = take(
            f"{pre}output.dense.weight", (d, c.intermediate_size)
        ).T
        arrays[("layers", i, "mlp_out_bias")] = take(f"{pre}output.dense.bias", (d,))
        arrays[("layers", i, "out_ln_scale")] = take(f"{pre}output.LayerNorm.weight", (d,))
        arrays[("layers", i, "out_ln_bias")] = take(f"{pre}output.LayerNorm.bias", (d,))
    ignored = ("embeddings.position_ids", "pooler.", "cls.")
    unused = src.unused(lambda name: name.startswith(ignored))
    if unused:
        raise UserInputError(
            f"checkpoint {source!r} has tensors a BertEncoder does not use "
            f"(a different architecture?): {unused[:5]}"
        )
    return arrays


def llama_arrays_from_hf(tensors: dict, config, source: str) -> dict:
    """HF ``LlamaModel`` tensors ("model." stripped) -> {NNX path: array}; config: LlamaConfig."""
    c = config
    d, h, k, dh, f = (
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.resolved_head_dim,
        c.intermediate_size,
    )
    src = TensorSource(tensors, source)
    arrays = {
        ("embed_tokens",): src.take("embed_tokens.weight", (c.vocab_size, d)),
        ("final_norm",): src.take("norm.weight", (d,)),
    }
    for i in range(c.num_layers):
        pre, at = f"layers.{i}.", ("layers", i)
        arrays[at + ("attn_norm",)] = src.take(f"{pre}input_layernorm.weight", (d,))
        arrays[at + ("mlp_norm",)] = src.take(f"{pre}post_attention_layernorm.weight", (d,))
        arrays[at + ("q_kernel",)] = src.take(
            f"{pre}self_attn.q_proj.weight", (h * dh, d)
        ).T.reshape(d, h, dh)
        arrays[at + ("k_kernel",)] = src.take(
            f"{pre}self_attn.k_proj.weight", (k * dh, d)
        ).T.reshape(d, k, dh)
        arrays[at + ("v_kernel",)] = src.take(
            f"{pre}self_attn.v_proj.weight", (k * dh, d)
        ).T.reshape(d, k, dh)
        arrays[at + ("o_kernel",)] = src.take(
            f"{pre}self_attn.o_proj.weight", (d, h * dh)
        ).T.reshape(h, dh, d)
        arrays[at + ("gate_kernel",)] = src.take(f"{pre}mlp.gate_proj.weight", (f, d)).T
        arrays[at + ("up_kernel",)] = src.take(f"{pre}mlp.up_proj.weight", (f, d)).T
        arrays[at + ("down_kernel",)] = src.take(f"{pre}mlp.down_proj.weight", (d, f)).T
    unused = src.unused(lambda name: name == "lm_head.weight" or name.endswith("inv_freq"))
    if unused:
        raise UserInputError(
            f"checkpoint {source!r} has tensors a LlamaModel does not use "
            f"(a different architecture?): {unused[:5]}"
        )
    return arrays


def load_tokenizer(model_dir: str, *, required: bool):
    """transformers.AutoTokenizer from local files only (no torch needed), or None.

    With ``required=False`` a directory without tokenizer files returns None.
    """
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in names):
        if required:
            raise UserInputError(
                f"model directory {model_dir!r} has no tokenizer files "
                f"(looked for {', '.join(names)})"
            )
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserInputError(f"cannot load the tokenizer in {model_dir!r}: {err}") from err
