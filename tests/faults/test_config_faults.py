"""Config faults: every value with a range, a broken config file and a missing checkpoint
end in one line and exit 2 before any device work, with nothing written."""

import time

import pytest
from cli_probe import cli, one_error_line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.train.steps=0", "train.steps must be a positive int"),
        ("--config.train.steps=-5", "train.steps must be a positive int"),
        ("--config.train.checkpoint_every=0", "train.checkpoint_every must be a positive int"),
        ("--config.train.log_every=0", "train.log_every must be a positive int"),
        ("--config.train.keep_checkpoints=0", "train.keep_checkpoints must be a positive int"),
        ("--config.train.eval_every=-1", "train.eval_every must be an int >= 0"),
        ("--config.train.grad_accum_steps=0", "train.grad_accum_steps must be a positive int"),
        ("--config.batch_size=100", "batch_size=100 must split into"),
        ("--config.train.ips_fit=linear", "train.ips_fit='linear' must be one of"),
        ("--config.train.ips_clip=(2.0, 5.0)", "train.ips_clip=(2.0, 5.0) must be"),
        ("--config.devices=0", "devices must be a positive int"),
        ("--config.mesh.data=3", "mesh: mesh shape"),
        ("--config.data.worker_count=-1", "data.worker_count must be an int >= 0"),
        ("--config.data.eval_examples=-1", "data.eval_examples must be an int >= 0"),
        ("--config.data.order=random", "data.order='random' must be one of"),
    ],
)
def test_train_values_out_of_range_stop_at_load(repo_root, tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    start = time.perf_counter()
    code, _, err = cli(
        capsys,
        "train",
        "--config",
        f"{repo_root}/configs/feed_ranker.py:size=tiny",
        "--workdir",
        str(workdir),
        override,
    )
    assert code == 2 and message in one_error_line(err, "train")
    assert time.perf_counter() - start < 10  # no dataset build, no device work
    assert not workdir.exists()  # nothing written


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "--config.devices=0",
            "config devices must be a positive int (devices the run is laid over), got 0",
        ),
        ("--config.devices=-8", "got -8"),
    ],
)
def test_plan_device_count_is_checked(repo_root, capsys, override, message):
    code, out, err = cli(
        capsys, "plan", "--config", f"{repo_root}/configs/feed_ranker.py", override
    )
    assert code == 2 and message in one_error_line(err, "plan") and not out


def test_demo_sections_are_checked(repo_root, capsys):
    code, _, err = cli(
        capsys,
        "config",
        "--config",
        f"{repo_root}/configs/demo.py",
        "--config.ranker.train.steps=0",
    )
    assert code == 2 and "config ranker.train.steps must be" in one_error_line(err, "config")


def test_dual_encoder_temperature_and_batch(repo_root, capsys):
    base = ["--config", f"{repo_root}/configs/dual_encoder.py"]
    code, _, err = cli(capsys, "config", *base, "--config.loss.temperature=0.0")
    assert code == 2 and "loss.temperature=0.0 must be > 0" in one_error_line(err, "config")
    code, _, err = cli(capsys, "config", *base, "--config.batch_size=12")
    assert code == 2 and "the mesh's data axis" in one_error_line(err, "config")


def test_config_file_with_a_syntax_error(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text("import ml_collections\n\ndef get_config(:\n    pass\n")
    code, _, err = cli(capsys, "config", "--config", str(path))
    line = one_error_line(err, "config")
    assert code == 2 and f"config file '{path}' line 3" in line


def test_config_file_whose_get_config_raises(tmp_path, capsys):
    path = tmp_path / "raises.py"
    path.write_text("def get_config(arg=None):\n    return {'a': 1}['b']\n")
    code, _, err = cli(capsys, "config", "--config", str(path))
    line = one_error_line(err, "config")
    assert code == 2 and "get_config(None)" in line and "KeyError: 'b' (line 2)" in line
    path.write_text("raise RuntimeError('no GPU here')\n")
    code, _, err = cli(capsys, "config", "--config", str(path))
    assert code == 2 and "RuntimeError: no GPU here (line 1)" in one_error_line(err, "config")


def test_eval_without_a_checkpoint_creates_nothing(repo_root, tmp_path, capsys):
    workdir = tmp_path / "empty"
    workdir.mkdir()
    code, out, err = cli(
        capsys,
        "eval",
        "--config",
        f"{repo_root}/configs/feed_ranker.py:size=tiny",
        "--workdir",
        str(workdir),
    )
    assert code == 2 and "no checkpoint in" in one_error_line(err, "eval")
    assert not out and list(workdir.iterdir()) == []  # no empty checkpoints/ directory
