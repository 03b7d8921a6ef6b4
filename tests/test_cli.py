import subprocess
import sys

import pytest

from lf_jax.cli import COMMANDS, main
from lf_jax.testing.environment import child_env


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    # serve reads everything from its artifacts; every other command reads a config
    assert ("--artifacts" if command == "serve" else "--config") in capsys.readouterr().out


def test_export_serving_checks_its_version_before_device_work(repo_root, tmp_path, capsys):
    args = ["export", "--serving", "--config", f"{repo_root}/configs/demo.py"]
    assert main([*args, "--output", str(tmp_path), "--version", "a/b"]) == 2
    assert "--version 'a/b': use letters" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main([*args, "--output", str(tmp_path / "file")]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_serve_refuses_a_missing_artifacts_directory(tmp_path, capsys):
    assert main(["serve", "--artifacts", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert f"--artifacts '{tmp_path / 'nope'}' is not a directory" in err


def test_config_override_round_trip(repo_root, capsys):
    assert (
        main(
            [
                "config",
                "--config",
                f"{repo_root}/configs/demo.py:devices=4",
                "--config.ranker.train.steps=7",
                "--config.mesh.model",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "steps: 7" in out and "devices: 4" in out and "model: 2" in out


def test_unknown_override_is_one_clear_error(repo_root, capsys):
    assert main(["config", "--config", f"{repo_root}/configs/demo.py", "--config.stepz=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'stepz'" in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_runs_in_a_fresh_process(tmp_path, repo_root, feed_builder, feed_data_dir):
    """The whole demo in a fresh process, reading the session's tiny feed_logs build (`make
    demo` builds it into its workdir; the build itself is tested in tests/input)."""
    env = child_env(CI="true")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lf_jax.cli",
            "demo",
            "--workdir",
            str(tmp_path / "demo"),
            f"--config.ranker.data.data_dir={feed_data_dir}",
            f"--config.dual_encoder.data.data_dir={feed_data_dir}",
            "--config.ranker.train.steps=4",
            "--config.ranker.batch_size=64",
            "--config.ranker.data.eval_examples=10000",  # of 100,000 in the random holdout
            "--config.dual_encoder.train.steps=4",
            "--config.dual_encoder.batch_size=64",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "mesh(data=2 x model=4) over 8 cpu" in out
    assert "plan for mesh data=2 x model=4 (8 devices)" in out  # the plan table is printed
    assert "row_wise(model)" in out and "column_wise(4)" in out
    assert "holdout_random" in out and "oracle" in out
    assert "recall@10 of held-out member->item pairs" in out and "popularity" in out
    assert "items     1,000 x 64 (cosine)" in out and "ScaNN" in out  # the tiny world's posts
    assert (
        "member m3: top 10 of 500 candidates" in out and "two-stage top 10 (ranker over 500)" in out
    )
    assert "latency for K=500: single query" in out
    assert "serving version v0001 on http://127.0.0.1:" in out  # through artifacts + server
    assert (tmp_path / "demo" / "serving" / "CURRENT").read_text().strip() == "v0001"
    demo = tmp_path / "demo"
    assert "demo finished" in out and (demo / "ranker" / "checkpoints").is_dir()
    for name in ("loss_curves.png", "recall_by_dim.png"):
        assert (demo / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (demo / "export" / "items" / "index" / "manifest.json").is_file()
    assert (demo / "export" / "members" / "kv" / "data.mdb").is_file()


def test_unwritable_workdir_fails_before_device_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--workdir", str(blocker / "sub")]) == 2
    assert "--workdir" in capsys.readouterr().err
