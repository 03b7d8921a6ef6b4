"""TFDS builder for member/item texts of the feed_logs world with planted positive pairs.

Configs: tiny (the feed_logs tiny world: 1k members, 3k items, 6k train / 2k test pairs,
seconds), small (100k members, 100k items). Splits: ``train`` and ``test`` (held-out)
member->item pairs, ``members`` and ``items`` (one record per entity, the corpus to embed).
Every record has the same fields (see simulator.py):

  member_id, item_id                 int64 (feed_logs ids; -1 for the absent side)
  member_key, item_key               str   "m<id>", "p<id>" ("" for the absent side)
  member_interests, member_hashtags  str
  member_numeric                     float32 [3] (metadata member_numeric names them)
  item_text, item_hashtags           str
  item_numeric                       float32 [4] (metadata item_numeric)

Example:
    >>> builder = build_dataset("member_items", "tiny", data_dir="/tmp/tfds")
    >>> builder.as_data_source("items")[0]["item_key"]    # b"p0"
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from lf_jax.data.member_items import simulator

_NAME = "member_items"
_REGISTERED = _NAME in tfds.core.registered.list_imported_builders()


@dataclasses.dataclass(eq=False)
class MemberItemsBuilderConfig(tfds.core.BuilderConfig):
    sim: simulator.MemberItemsConfig | None = None


class MemberItems(tfds.core.GeneratorBasedBuilder, skip_registration=_REGISTERED):
    """Member and item prompts' raw fields and member->item positive pairs."""

    name = _NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        MemberItemsBuilderConfig(
            name=size, sim=simulator.CONFIGS[size], description=f"feed_logs {size} world as text"
        )
        for size in ("tiny", "small")
    ]
    DEFAULT_CONFIG_NAME = "tiny"

    def _info(self) -> tfds.core.DatasetInfo:
        text, scalar = tfds.features.Text(), tfds.features.Scalar(np.int64)
        features = tfds.features.FeaturesDict(
            {
                "member_id": scalar,
                "item_id": scalar,
                "member_key": text,
                "item_key": text,
                "member_interests": text,
                "member_hashtags": text,
                "member_numeric": tfds.features.Tensor(
                    shape=(len(simulator.MEMBER_NUMERIC),), dtype=np.float32
                ),
                "item_text": text,
                "item_hashtags": text,
                "item_numeric": tfds.features.Tensor(
                    shape=(len(simulator.ITEM_NUMERIC),), dtype=np.float32
                ),
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
        entities = simulator.make_entities(self.builder_config.sim)
        return {split: self._generate_examples(split, entities) for split in simulator.SPLITS}

    def _generate_examples(self, split, entities):
        yield from simulator.iter_examples(self.builder_config.sim, split, entities)
