"""Text inputs of the encoders: percentile-bucket words, prompt templates, a word-level
tokenizer trained offline, padded token arrays, and resumable step-indexed samplers.

* Numeric features become words so a decoder can read them: ``PercentileBuckets`` fits
  edges at the 100/n percentiles of a feature and maps a value to one of n words
  (``BUCKET_WORDS`` for n=5: lowest, low, medium, high, highest).
* ``render_prompt(template, fields)``: ``str.format`` of a config template, e.g.
  ``"member interests {interests} tags {hashtags} followers {followers}"``.
* ``train_word_tokenizer(corpus, path)``: a deterministic WordLevel tokenizer (``tokenizers``)
  over the corpus' words, saved as tokenizer.json and loaded as a transformers
  PreTrainedTokenizerFast (pad id 0, unk 1, eos 2).
* ``tokenize(tokenizer, texts, max_length, eos=...)`` -> int32 ids and mask [N, L].
* ``StepSampler``: batch n is a pure function of (seed, n), so ``get_state()`` is
  ``{"step": n}`` and a restarted run resumes exactly. ``TaskMixtureSampler`` draws, at each
  step, one task per data-parallel group with configurable proportions (task-heterogeneous
  batches: group g's b rows all come from task t_g).

Example:
    >>> buckets = PercentileBuckets.fit(followers_n, num_buckets=5)
    >>> buckets.words(np.array([3.0, 900.0]))                  # ['low', 'highest']
    >>> tok = train_word_tokenizer(prompts, workdir / "tokenizer.json")
    >>> ids_nl, mask_nl = tokenize(tok, prompts, max_length=48, eos=True)
"""

import dataclasses
import json
import os
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from lf_jax.errors import UserInputError

BUCKET_WORDS = {3: ("low", "medium", "high"), 5: ("lowest", "low", "medium", "high", "highest")}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[EOS]")


@dataclasses.dataclass(frozen=True)
class PercentileBuckets:
    """Edges [n-1] at the k/n percentiles of a feature, and the n words naming the buckets."""

    edges: tuple[float, ...]
    names: tuple[str, ...]

    @classmethod
    def fit(cls, values_n: np.ndarray, num_buckets: int = 5) -> "PercentileBuckets":
        if num_buckets not in BUCKET_WORDS:
            raise UserInputError(
                f"num_buckets={num_buckets!r} must be one of {sorted(BUCKET_WORDS)}"
            )
        values_n = np.asarray(values_n, np.float64)
        if values_n.size == 0 or not np.all(np.isfinite(values_n)):
            raise UserInputError("PercentileBuckets.fit needs a non-empty array of finite values")
        edges = np.percentile(values_n, 100.0 * np.arange(1, num_buckets) / num_buckets)
        return cls(tuple(float(e) for e in edges), BUCKET_WORDS[num_buckets])

    def index(self, values_n: np.ndarray) -> np.ndarray:
        """Bucket of each value in 0..n-1 (a value equal to an edge goes up)."""
        return np.searchsorted(
            np.asarray(self.edges), np.asarray(values_n, np.float64), side="right"
        )

    def words(self, values_n: np.ndarray) -> list[str]:
        return [self.names[i] for i in self.index(values_n)]


def as_text(value) -> str:
    """A tfds string field (bytes or str) as str."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def template_fields(template: str) -> list[str]:
    """The ``{name}`` placeholders of a template, in order."""
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError as error:
        raise UserInputError(f"prompt template {template!r} is malformed: {error}") from None


def render_prompt(template: str, fields: Mapping[str, str]) -> str:
    """``template`` with every ``{name}`` replaced by ``fields[name]``."""
    missing = [name for name in template_fields(template) if name not in fields]
    if missing:
        raise UserInputError(
            f"prompt template {template!r} names unknown field(s) {missing} "
            f"(known: {sorted(fields)})"
        )
    return template.format(**fields)


def render_prompts(
    template: str,
    texts: Mapping[str, Sequence[str]],
    numeric: Mapping[str, np.ndarray],
    buckets: Mapping[str, PercentileBuckets],
) -> list[str]:
    """One prompt per entity: text fields as they are, numeric fields as bucket words."""
    columns = {name: list(values) for name, values in texts.items()}
    for name, values in numeric.items():
        columns[name] = buckets[name].words(values)
    count = len(next(iter(columns.values())))
    return [
        render_prompt(template, {name: column[i] for name, column in columns.items()})
        for i in range(count)
    ]


def _words(text: str) -> list[str]:
    from tokenizers.pre_tokenizers import Whitespace

    return [piece for piece, _ in Whitespace().pre_tokenize_str(text)]


def train_word_tokenizer(corpus: Sequence[str], path: str | Path):
    """A WordLevel tokenizer over the words of ``corpus`` (sorted: deterministic), saved to
    ``path`` (tokenizer.json) and returned as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({word for text in corpus for word in _words(text)} - set(SPECIAL_TOKENS))
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + tuple(words))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(path))
    except OSError as error:
        raise UserInputError(f"cannot write the tokenizer to '{path}': {error.strerror}") from None
    return load_word_tokenizer(path)


def load_word_tokenizer(path: str | Path):
    """The tokenizer.json written by ``train_word_tokenizer``, as PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(path):
        raise UserInputError(f"tokenizer file '{path}' does not exist")
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path), pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def tokenize(
    tokenizer, texts: Sequence[str], max_length: int, *, eos: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """int32 ids and attention mask [N, max_length], right-padded with the pad id; with
    ``eos`` the eos token ends every text (kept when truncating, for last-token pooling)."""
    if not isinstance(max_length, int) or max_length < 2:
        raise UserInputError(f"max_length must be an int >= 2, got {max_length!r}")
    encoded = tokenizer(
        list(texts), add_special_tokens=False, truncation=True, max_length=max_length - int(eos)
    )["input_ids"]
    ids_nl = np.full((len(encoded), max_length), tokenizer.pad_token_id, np.int32)
    mask_nl = np.zeros((len(encoded), max_length), np.int32)
    for row, ids in enumerate(encoded):
        ids = list(ids) + ([tokenizer.eos_token_id] if eos else [])
        ids_nl[row, : len(ids)] = ids
        mask_nl[row, : len(ids)] = 1
    return ids_nl, mask_nl


class StepSampler:
    """Iterator whose n-th batch is ``make_batch(rng(seed, n), n)``; state ``{"step": n}``."""

    def __init__(self, make_batch: Callable[[np.random.Generator, int], dict], seed: int):
        self.make_batch, self.seed, self.step = make_batch, int(seed), 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.step,)))
        batch = self.make_batch(rng, self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: Mapping | str) -> None:
        state = json.loads(state) if isinstance(state, str) else dict(state)
        if not isinstance(state.get("step"), int) or state["step"] < 0:
            raise UserInputError(f"sampler state {state!r} has no non-negative int 'step'")
        self.step = state["step"]


def task_mixture_indices(
    rng: np.random.Generator,
    task_sizes: Sequence[int],
    proportions: Sequence[float],
    num_groups: int,
    group_batch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(task of each group [G], row index within that task [G, b]) for one step."""
    p = np.asarray(proportions, np.float64)
    if p.shape != (len(task_sizes),) or np.any(p < 0) or p.sum() <= 0:
        raise UserInputError(
            f"task proportions {list(proportions)} must be {len(task_sizes)} "
            f"non-negative numbers with a positive sum"
        )
    tasks_g = rng.choice(len(task_sizes), num_groups, p=p / p.sum())
    rows_gb = np.stack([rng.integers(0, task_sizes[t], group_batch) for t in tasks_g])
    return tasks_g, rows_gb
