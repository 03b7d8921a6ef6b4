"""TFDS builder for the synthetic post texts of the post encoder (array_record, offline).

Configs: tiny (16k train pairs, 1.5k test triplets, seconds), small (160k / 10k); see
simulator.CONFIGS. One example per pair (train) or triplet (test):

  task           str    interests | storylines | hashtags | queries (train and test);
                        intent (test only: the zero-shot task)
  text           str    the anchor text (interest, storyline, hashtags, query, intent)
  post           str    the post (train: positive or negative by label; test: positive)
  negative_post  str    test: a post of another topic; train: ""
  label          int64  1 when post shares the text's topic
  topic          int64  the text's topic

Example (lf_jax.input.build_dataset does this for you):
    >>> builder = build_dataset("post_texts", "tiny", data_dir="/tmp/tfds")
    >>> builder.as_data_source("test")[0]["task"]
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from lf_jax.data.post_texts import simulator

_NAME = "post_texts"
_REGISTERED = _NAME in tfds.core.registered.list_imported_builders()


@dataclasses.dataclass(eq=False)
class PostTextsConfig(tfds.core.BuilderConfig):
    sim: simulator.TextConfig | None = None


class PostTexts(tfds.core.GeneratorBasedBuilder, skip_registration=_REGISTERED):
    """Multi-task (text, post, label) pairs and held-out triplets with topic labels."""

    name = _NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        PostTextsConfig(name=size, sim=simulator.CONFIGS[size], description=f"post texts, {size}")
        for size in ("tiny", "small")
    ]
    DEFAULT_CONFIG_NAME = "tiny"

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        features = tfds.features.FeaturesDict(
            {
                "task": text,
                "text": text,
                "post": text,
                "negative_post": text,
                "label": tfds.features.Scalar(np.int64),
                "topic": tfds.features.Scalar(np.int64),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=features,
            metadata=tfds.core.MetadataDict(self.builder_config.sim.metadata()),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # synthetic
        return {split: self._generate_examples(split) for split in simulator.SPLITS}

    def _generate_examples(self, split):
        yield from simulator.iter_examples(self.builder_config.sim, split)
