"""``lf-jax export --serving``: a new artifact version and the feature store from checkpoints.

    DIR/versions/<version>/ranker/      the feed ranker (artifact.py layout)
    DIR/versions/<version>/retrieval/   the dual encoder's member tower + item vectors
    DIR/features/                       the feature store (feature_store.py), updated in place
    DIR/CURRENT                         the version a server serves (switched last)

A config with ``ranker`` and ``dual_encoder`` sections (configs/demo.py) exports both from
``workdir/ranker`` and ``workdir/dual_encoder``; a feed_ranker or dual_encoder config
exports its one model from ``workdir``. Each version is written into a temporary
directory, fsynced and renamed into place; CURRENT is replaced by a rename, so a server
polling it never sees half a version. The ranker's manifest records the holdout_random
AUC with float32 and with int8 tables (the AUC cost of quantization). A ranker trained
with dynamic tables serves each one as its alive keys' rows plus an id -> row map, an
absent id pooling as padding as in training (dynamic_tables.py); its manifest's
"dynamic_tables" gives per table the ids, capacity, alive and served keys.

Example:
    >>> result = export_serving(load_config("configs/demo.py"), "runs/demo", "runs/demo/serving",
    ...                         dtype="int8")
    >>> result["version"], result["bytes"]          # "v0001", {"ranker": ..., "retrieval": ...}
"""

import os
import re
import shutil
import uuid
from pathlib import Path

import jax
import numpy as np

from lf_jax import feed_world
from lf_jax.errors import UserInputError
from lf_jax.serving.dynamic_tables import host_ids, served_dynamic_tables
from lf_jax.serving.feature_store import FeatureStore
from lf_jax.serving.feed_features import layout_for
from lf_jax.serving.functions import encode_table, ranker_probs
from lf_jax.serving.service import CURRENT
from lf_jax.workdir import fsync_tree

VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def next_version(root: Path) -> str:
    """ "v0001" for an empty ``root``, else one past the highest "v<N>" under versions/."""
    numbers = [
        int(p.name[1:])
        for p in (root / "versions").glob("v*")
        if p.name[1:].isdigit() and p.is_dir()
    ]
    return f"v{max(numbers, default=0) + 1:04d}"


def _sections(config, workdir: Path) -> dict:
    """{"ranker": (config, workdir), "dual_encoder": (config, workdir)} present in ``config``."""
    if "ranker" in config and "dual_encoder" in config:
        out = {
            "ranker": (config.ranker, workdir / "ranker"),
            "dual_encoder": (config.dual_encoder, workdir / "dual_encoder"),
        }
        for section, _ in out.values():
            if not section.data.data_dir and (workdir / "tfds").is_dir():
                with section.unlocked():
                    section.data.data_dir = str((workdir / "tfds").resolve())
        return out
    family = config.get("model_family", "")
    if family == "feed_ranker":
        return {"ranker": (config, workdir)}
    if family == "dual_encoder":
        return {"dual_encoder": (config, workdir)}
    raise UserInputError(
        f"config model_family={family!r}: --serving exports feed_ranker and dual_encoder "
        "models (or a config with ranker and dual_encoder sections, like configs/demo.py)"
    )


def holdout_auc(
    source,
    weights_by_dtype: dict,
    features,
    split: str = "holdout_random",
    max_examples: int | None = None,
) -> tuple[dict, int]:
    """Mean and per-task AUC on ``split`` of the ranker with each weights set (one CPU
    device), and the number of examples scored: the split's first ``max_examples`` (all of
    it when None), like the trainer's evaluation with ``data.eval_examples``."""
    from lf_jax.input.feed_pipeline import EvalReader
    from lf_jax.train.metrics import auc

    model = source.model
    graphdef = model.graphdef
    treedef = jax.tree.structure(jax.device_get(source.state["params"]))
    device = jax.local_devices(backend="cpu")[0]
    fn = jax.jit(lambda w, s, d: ranker_probs(graphdef, treedef, features, w, s, d))
    placed = {name: jax.device_put(w, device) for name, w in weights_by_dtype.items()}
    reader = EvalReader(
        model.builder, split, global_batch_size=4096, max_lengths=None, max_examples=max_examples
    )
    probs: dict[str, list] = {name: [] for name in placed}
    labels, valid = [], []
    for host in reader:
        sparse = host_ids(model, {n: host[n] for n in model.collection.features})
        dense = np.asarray(host["dense"], np.float32)
        for name, w in placed.items():
            probs[name].append(np.asarray(fn(w, sparse, dense)))
        labels.append(host["labels"])
        valid.append(host["valid"])
    mask = np.concatenate(valid)
    y = np.concatenate(labels)[mask]
    out = {}
    for name, parts in probs.items():
        p = np.concatenate(parts)[mask]
        per_task = {t: auc(p[:, i], y[:, i]) for i, t in enumerate(model.tasks)}
        out[name] = {"mean": float(np.mean(list(per_task.values()))), **per_task}
    return out, int(mask.sum())


def _ranker(config, workdir, out: Path, dtype, version, buckets, task_weights, layout, sizes):
    from lf_jax.export.corpus_sources import RankerCorpus
    from lf_jax.serving.export import ranker_artifact

    source = RankerCorpus(config, workdir)
    model = source.model
    tables = model.collection.logical_tables(source.state["embedding"])
    dynamic: dict = {}
    if model.dynamic is not None:  # compacted rows of the alive keys, id -> row maps
        served = served_dynamic_tables(source)
        tables.update(served.tables)
        dynamic = {"key_rows": served.key_rows, "summary": served.summary}
    features = {
        name: (spec.table, spec.combiner) for name, spec in model.collection.features.items()
    }
    params = jax.device_get(source.state["params"])
    common = {
        "params": jax.tree.leaves(params),
        "dense_mean": model.dense_mean_k,
        "dense_std": model.dense_std_k,
        **({"key_rows": dynamic["key_rows"]} if dynamic else {}),
    }
    aucs, examples = holdout_auc(
        source,
        {
            d: {**common, "tables": {n: encode_table(v, d) for n, v in tables.items()}}
            for d in ("float32", "int8")
        },
        features,
        max_examples=config.data.get("eval_examples", 0) or None,
    )
    quality = {"holdout_random_auc": aucs, "holdout_random_examples": examples}
    return ranker_artifact(
        out,
        graphdef=model.graphdef,
        params=params,
        tables=tables,
        features=features,
        dense_mean=model.dense_mean_k,
        dense_std=model.dense_std_k,
        tasks=model.tasks,
        task_weights=task_weights or {t: 1.0 for t in model.tasks},
        layout=layout,
        num_members=sizes.num_members,
        num_posts=sizes.num_posts,
        dtype=dtype,
        version=version,
        source={"workdir": str(Path(workdir).resolve()), "checkpoint_step": source.step},
        quality=quality,
        dynamic=dynamic or None,
        **buckets,
    )


def export_serving(
    config,
    workdir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "int8",
    version: str | None = None,
    queries=(1, 4, 16),
    candidates=(512, 2048),
) -> dict:
    """Writes a new version (and the feature store) under ``output``; see the module docstring."""
    from lf_jax.export.corpus_sources import DualEncoderCorpus
    from lf_jax.serving.export import retrieval_artifact

    root, workdir = Path(output), Path(workdir)
    version = version or next_version(root)
    if not VERSION_PATTERN.match(version):
        raise UserInputError(f"--version {version!r}: use letters, digits, '.', '_' or '-'")
    if (root / "versions" / version).exists():
        raise UserInputError(f"version '{version}' already exists under '{root / 'versions'}'")
    sections = _sections(config, workdir)
    data_config = next(iter(sections.values()))[0].data.config
    world = feed_world.CONFIGS[data_config]
    seed = int(config.get("seed", 0))
    buckets = {"queries": tuple(queries), "candidates": tuple(candidates)}
    serving = config.get("serving")
    task_weights = dict(serving.task_weights) if serving is not None else None
    staging = root / "versions" / f".{version}.tmp-{uuid.uuid4().hex[:8]}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    prompts = np.zeros((world.num_members, 0), np.float32)
    manifests = {}
    try:
        if "dual_encoder" in sections:
            section, directory = sections["dual_encoder"]
            source = DualEncoderCorpus(section, directory)
            enc = source.model
            member_keys, _ = enc.corpus("member")
            ids, mask = enc.tokens["member"]
            prompts = np.full((world.num_members, ids.shape[1]), -1, np.float32)
            prompts[[int(k[1:]) for k in member_keys]] = np.where(mask > 0, ids, -1)
            item_keys, records = source.corpus("items")
            layout = layout_for(world, prompts.shape[1])
            manifests["retrieval"] = retrieval_artifact(
                staging / "retrieval",
                graphdef=enc.graphdef,
                params=source.state["params"],
                items=source.embed("items", records),
                item_keys=item_keys,
                num_members=world.num_members,
                layout=layout,
                pad_id=int(enc.tokenizer.pad_token_id),
                dtype=dtype,
                version=version,
                source={"workdir": str(directory.resolve()), "checkpoint_step": source.step},
                **buckets,
            )
        layout = layout_for(world, prompts.shape[1])
        if "ranker" in sections:
            section, directory = sections["ranker"]
            manifests["ranker"] = _ranker(
                section,
                directory,
                staging / "ranker",
                dtype,
                version,
                buckets,
                task_weights,
                layout,
                world,
            )
        counts = FeatureStore.write(root / "features", world, prompts, version=version, seed=seed)
        fsync_tree(staging)
        staging.rename(root / "versions" / version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    tmp = root / f".{CURRENT}.tmp"
    tmp.write_text(version + "\n")
    os.replace(tmp, root / CURRENT)
    return {
        "version": version,
        "directory": str((root / "versions" / version).resolve()),
        "bytes": {name: m["bytes"] for name, m in manifests.items()},
        "manifests": manifests,
        "features": {"written": counts.written, "unchanged": counts.unchanged, "new": counts.new},
    }
