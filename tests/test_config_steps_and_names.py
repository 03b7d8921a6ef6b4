"""Step-derived intervals follow train.steps; packaged config names; a workdir's config;
remote workdirs refused with one line before anything is created."""

import json

import pytest

from lf_jax.cli import main
from lf_jax.configuration import (
    ConfigError,
    apply_overrides,
    load_config,
    load_workdir_config,
    packaged_configs,
)


def _train(config):
    t = config.train
    return t.steps, t.log_every, t.eval_every, t.checkpoint_every, t.warmup_steps


def test_overriding_steps_scales_the_intervals_left_unset():
    tiny = load_config("feed_ranker:size=tiny")
    assert _train(tiny) == (800, 80, 400, 400, 40)
    assert _train(apply_overrides(tiny, {"train.steps": "100"})) == (100, 10, 50, 50, 5)
    explicit = apply_overrides(
        load_config("feed_ranker:size=tiny"), {"train.steps": "100", "train.eval_every": "30"}
    )
    assert _train(explicit) == (100, 10, 30, 50, 5)  # the explicit one is kept
    short = apply_overrides(load_config("feed_ranker:size=tiny"), {"train.steps": "3"})
    assert _train(short) == (3, 1, 2, 2, 1)  # never below 1
    demo = apply_overrides(load_config("demo"), {"ranker.train.steps": "30"})
    assert (demo.ranker.train.log_every, demo.ranker.train.eval_every) == (5, 30)
    off = load_config("feed_ranker:size=tiny")
    apply_overrides(off, {"train.eval_every": "0"})
    assert apply_overrides(off, {"train.steps": "80"}).train.eval_every == 0  # 0 stays off


def test_packaged_names_and_repository_paths_load_the_same_file(repo_root):
    assert {"demo", "feed_ranker", "dual_encoder", "post_encoder"} <= set(packaged_configs())
    by_name = load_config("feed_ranker:size=small")
    by_path = load_config(f"{repo_root}/configs/feed_ranker.py:size=small")
    assert by_name.to_dict() == by_path.to_dict() and by_name.size == "small"
    with pytest.raises(ConfigError, match="neither a file .* nor a packaged config"):
        load_config("feed_rankr")


def test_workdir_config_round_trips(tmp_path):
    config = load_config("feed_ranker:size=tiny")
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=1))
    loaded = load_workdir_config(tmp_path)
    assert loaded.train.steps == 800 and list(loaded.model.mlp_dims) == [256, 128]
    assert apply_overrides(loaded, {"train.steps": "8"}).train.log_every == 1
    with pytest.raises(ConfigError, match=r"--workdir='.*missing' has no config.json"):
        load_workdir_config(tmp_path / "missing")
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ConfigError, match="not a config object"):
        load_workdir_config(tmp_path)


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--config", "feed_ranker:size=tiny", "--workdir", "gs://bucket/runs/x"],
        ["eval", "--workdir", "s3://bucket/runs/x"],
        ["ips", "--config", "feed_ranker", "--workdir", "gs://bucket/runs/x"],
        ["train", "--config", "feed_ranker", "--config.data.data_dir=gs://b/tfds"]
        + ["--workdir", "WORKDIR"],
    ],
)
def test_remote_urls_are_refused_in_one_line(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path / "w") if a == "WORKDIR" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a remote URL" in err and "mount" in err, err
    assert not (tmp_path / "gs:").exists() and not (tmp_path / "s3:").exists()


def test_eval_reads_the_workdir_config_and_names_the_step(
    shrunk_ranker_config, feed_builder, tmp_path, capsys
):
    from lf_jax.train.checkpoint import Checkpointer
    from lf_jax.train.loop import build_task, prepare_workdir

    config = shrunk_ranker_config()
    with config.unlocked():
        config.train.ips = False
        config.data.eval_batch_size = 512
    workdir = prepare_workdir(tmp_path / "run", config)
    task = build_task(config, workdir)
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(3, task.init_state(), task.collection, {})
    checkpointer.close()
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 64
    assert main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert f"evaluated checkpoint step 3 of {workdir.resolve()}" in out
    assert "holdout_random" in out
