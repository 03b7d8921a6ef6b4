"""Running ``lf-jax`` in-process for the fault suite: the shrunk tiny ranker's arguments,
the one-line error every user fault must end in, and damaging a checkpoint step."""

import os
from pathlib import Path

from lf_jax.cli import main

STEPS = 6  # the trained workdir's train.steps; checkpoints every 2 steps, 3 kept


def ranker_args(repo_root, data_dir, workdir, *extra: str) -> list[str]:
    """``--config`` and overrides of the shrunk tiny ranker (as tests/conftest.py's
    shrunk_ranker_config, IPS and eval off) for a ``lf-jax train/eval/export`` command."""
    return [
        "--config",
        f"{repo_root}/configs/feed_ranker.py:size=tiny",
        "--workdir",
        str(workdir),
        "--config.batch_size=64",
        "--config.embedding.tables.member.dim=16",
        "--config.embedding.tables.hashtag.dim=16",
        "--config.embedding.tables.post.dim=16",
        "--config.embedding.features.history_actors.max_ids=10",
        "--config.embedding.features.history_hashtags.max_ids=10",
        "--config.model.mlp_dims=(32,)",
        "--config.model.dcn_layers=1",
        f"--config.train.steps={STEPS}",
        "--config.train.checkpoint_every=2",
        "--config.train.keep_checkpoints=3",
        "--config.train.eval_every=0",
        "--config.train.log_every=2",
        "--config.train.ips=false",
        "--config.data.eval_batch_size=512",
        f"--config.data.data_dir={data_dir}",
        *extra,
    ]


def cli(capsys, command: str, *args: str) -> tuple[int, str, str]:
    """Runs ``lf-jax COMMAND ARGS`` in this process: (exit status, stdout, stderr)."""
    code = main(["--verbosity", "warning", command, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    """The one ``lf-jax COMMAND: error: ...`` line of ``err`` (absl's own log lines aside),
    asserting there is exactly one and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"lf-jax {command}:")]
    assert len(lines) == 1, err
    return lines[0]


def damage(step_dir: Path, mode: str) -> Path:
    """Truncates or deletes the largest data file of ``step_dir``'s dense state; returns it."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    target = max(files, key=lambda p: p.stat().st_size)
    if mode == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    else:
        target.unlink()
    return target


def steps_of(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
