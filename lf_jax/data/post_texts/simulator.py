"""Synthetic post texts with known topics: posts, member interests, storylines, hashtags,
search queries and intents, for the multi-task post encoder.

Pure numpy, deterministic given the seed. Topics own disjoint vocabularies drawn from
``WORD_POOL`` by a seeded permutation (``topic_vocabularies``), so which words belong
together is arbitrary: an untuned sentence encoder only sees word overlap, and a tuned one
has to learn the topics. data/member_items renders the feed_logs world with the same
vocabularies (same ``num_topics`` and ``seed``).

Tasks (anchor text -> post): ``interests`` ("into w1, w2 and w3"), ``storylines`` (a
headline), ``hashtags`` ("#w1_x #w2_y"), ``queries`` (two or three words), and the
zero-shot ``intent`` ("looking for help with w1 and w2"), which is never trained on.
Anchors of a pair are drawn independently of the post's words (some overlap by chance).

Example:
    >>> cfg = CONFIGS["tiny"]
    >>> rows = list(iter_examples(cfg, "train"))[:2]  # (key, {"task", "text", "post", ...})
"""

import dataclasses
from collections.abc import Iterator

import numpy as np

WORD_POOL = tuple(
    """
apple river stone garden window candle mirror ladder pocket button ribbon basket blanket
bottle bridge castle cotton desert engine feather forest harbor helmet island jacket jungle
kettle lantern marble meadow needle orchard paddle pepper pillow planet pocket puzzle rabbit
rocket saddle shadow silver socket spider spring statue summer sunset tablet teapot ticket
timber tunnel valley velvet violin wagon walnut wizard anchor arrow badge barrel beacon
bicycle blossom bucket cabin canyon carpet cereal chimney circus cliff clover comet compass
copper coral cradle crystal dolphin dragon falcon fiddle flame flute fossil fountain galaxy
glacier goblet granite hammer hazel hornet iceberg ivory jelly kitten lagoon lemon lizard
magnet mango maple meteor mitten monkey mosaic mustard nectar noodle oasis olive onion
otter oyster panda parrot peach pebble pencil pickle pigeon pirate pistachio plum pony
pumpkin quartz quilt radish raven reef rhino saffron salmon sapphire scarf scooter
seashell sherbet shovel skate sled snail sparrow spice squid stork straw sugar swan
thimble thistle thunder tiger tomato torch trumpet tulip turtle umbrella vanilla vessel
volcano walrus whale whistle willow wolf zebra acorn almond antler apron atlas avocado
bagel bamboo banjo beetle biscuit bison bonnet boulder bramble bronze buffalo cactus
camel canoe caramel cedar cherry chestnut cobra coconut cricket crown cupcake daisy
donkey eagle ember fern fig flamingo garlic gazelle ginger giraffe gorilla grape hamster
harp hedgehog heron honey igloo jasmine kayak koala lasso lava lobster lotus lynx
magpie mammoth meerkat melon mint moose moth muffin nutmeg octopus orchid owl pasta
peanut pelican penguin pine poppy prism puffin quail raft reindeer robin rose ruby
sandal scallop seal shark sheep shrimp sloth spinach sponge squirrel swamp taco tapir
toad toffee trout tuba tuna vulture waffle wasp weasel wombat yak yogurt basil beet
bolt broom cape cello chalk clam cloak cork crane dagger dune elm flint fox frost gem
gull hawk hive hoof jade kite lark leek lily lime loom mole moss nest oak orca
pearl plank pond quill reed rust sage shell silk slate sloop smelt snow sole spade
stem surf tide toga tusk vine wand wheat wren yarn""".split()
)
WORD_POOL = tuple(dict.fromkeys(WORD_POOL))  # drop repeats, keep order

FILLER = (
    "today",
    "really",
    "just",
    "new",
    "great",
    "look",
    "this",
    "my",
    "our",
    "week",
    "photo",
    "video",
    "thread",
    "update",
    "shared",
    "love",
    "check",
    "nice",
)
TASKS = ("interests", "storylines", "hashtags", "queries")
ZERO_SHOT_TASKS = ("intent",)
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextConfig:
    name: str
    num_topics: int = 12
    words_per_topic: int = 24
    train_pairs_per_task: int = 4000
    test_triplets_per_task: int = 300
    seed: int = 0

    def metadata(self) -> dict:
        return {
            "config": self.name,
            "num_topics": self.num_topics,
            "words_per_topic": self.words_per_topic,
            "tasks": list(TASKS),
            "zero_shot_tasks": list(ZERO_SHOT_TASKS),
            "seed": self.seed,
            "num_examples": {
                "train": self.train_pairs_per_task * len(TASKS),
                "test": self.test_triplets_per_task * (len(TASKS) + len(ZERO_SHOT_TASKS)),
            },
        }


CONFIGS = {
    "tiny": TextConfig(name="tiny"),
    "small": TextConfig(name="small", train_pairs_per_task=40_000, test_triplets_per_task=2_000),
}


def topic_vocabularies(
    num_topics: int, words_per_topic: int, seed: int = 0
) -> list[tuple[str, ...]]:
    """Disjoint word lists, one per topic, from a seeded permutation of WORD_POOL."""
    if num_topics * words_per_topic > len(WORD_POOL):
        raise ValueError(
            f"num_topics * words_per_topic = {num_topics * words_per_topic} exceeds "
            f"the {len(WORD_POOL)} words of WORD_POOL"
        )
    order = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,))).permutation(
        len(WORD_POOL)
    )
    words = [WORD_POOL[i] for i in order]
    return [
        tuple(words[t * words_per_topic : (t + 1) * words_per_topic]) for t in range(num_topics)
    ]


def hashtag_name(first: str, second: str) -> str:
    return f"#{first}_{second}"


def _pick(rng, vocab, count):
    return [vocab[i] for i in rng.choice(len(vocab), count, replace=False)]


def render_post(rng, vocab) -> str:
    """A post: filler, 4-6 topic words, sometimes a hashtag of the topic."""
    words = _pick(rng, vocab, int(rng.integers(4, 7)))
    filler = _pick(rng, FILLER, 2)
    text = f"{filler[0]} {' '.join(words[:2])} {filler[1]} {' '.join(words[2:])}"
    if rng.random() < 0.4:
        a, b = _pick(rng, vocab, 2)
        text += " " + hashtag_name(a, b)
    return text


def render_anchor(rng, task: str, vocab) -> str:
    """The text side of a pair for ``task`` (see module docstring)."""
    if task == "interests":
        a, b, c = _pick(rng, vocab, 3)
        return f"into {a}, {b} and {c}"
    if task == "storylines":
        words = _pick(rng, vocab, 4)
        return f"{words[0]} and {words[1]}: the {words[2]} {words[3]} story continues"
    if task == "hashtags":
        words = _pick(rng, vocab, 4)
        return f"{hashtag_name(words[0], words[1])} {hashtag_name(words[2], words[3])}"
    if task == "queries":
        return " ".join(_pick(rng, vocab, int(rng.integers(2, 4))))
    if task == "intent":
        a, b = _pick(rng, vocab, 2)
        return f"looking for help with {a} and {b}"
    raise ValueError(f"unknown task {task!r}")


def iter_examples(cfg: TextConfig, split: str) -> Iterator[tuple[int, dict]]:
    """(key, example): train has (text, post, label) pairs, half positive; test has
    (anchor=text, positive=post, negative=negative_post) triplets, label 1."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    vocabs = topic_vocabularies(cfg.num_topics, cfg.words_per_topic, cfg.seed)
    tasks = TASKS if split == "train" else TASKS + ZERO_SHOT_TASKS
    count = cfg.train_pairs_per_task if split == "train" else cfg.test_triplets_per_task
    key = 0
    for task_index, task in enumerate(tasks):
        rng = np.random.default_rng(
            np.random.SeedSequence(cfg.seed, spawn_key=(SPLITS.index(split), task_index))
        )
        for _ in range(count):
            topic, other = rng.choice(cfg.num_topics, 2, replace=False)
            anchor = render_anchor(rng, task, vocabs[topic])
            if split == "train":
                label = int(rng.random() < 0.5)
                post = render_post(rng, vocabs[topic if label else other])
                negative = ""
            else:
                label, post, negative = (
                    1,
                    render_post(rng, vocabs[topic]),
                    render_post(rng, vocabs[other]),
                )
            yield (
                key,
                {
                    "task": task,
                    "text": anchor,
                    "post": post,
                    "negative_post": negative,
                    "label": label,
                    "topic": int(topic),
                },
            )
            key += 1
