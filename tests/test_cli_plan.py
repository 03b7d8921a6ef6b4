import json
import subprocess
import sys

from lf_jax.cli import main
from lf_jax.configuration import load_config
from lf_jax.distributed.mesh import make_mesh
from lf_jax.embedding.config_specs import specs_from_config
from lf_jax.embedding.plan import load_plan, validate_plan
from lf_jax.testing.environment import child_env


def test_plan_prints_the_table_for_tiny(repo_root, capsys):
    assert main(["plan", "--config", f"{repo_root}/configs/feed_ranker.py:size=tiny"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("plan for mesh data=2 x model=4 (8 devices), batch 512")
    assert lines[1].split()[:5] == ["table", "rows", "dim", "bytes", "strategy"]
    for name in ("member", "hashtag", "position"):
        assert any(line.startswith(name + " ") for line in lines)
    assert "data_parallel" in out and lines[-2].startswith("max per device: ")
    assert lines[-1].startswith("sparse step kernel: auto (")


def test_plan_for_a_large_mesh_without_its_devices(repo_root, capsys):
    assert (
        main(
            [
                "plan",
                "--config",
                f"{repo_root}/configs/feed_ranker.py:size=large",
                "--config.mesh.data=8",
                "--config.devices=64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "mesh data=8 x model=8 (64 devices), batch 16,384 (256 per device)" in out
    assert "1,000,001" in out and "row_wise(model)" in out  # 1e6 members + the OOV row
    assert "rows split over model (8 devices)" in out


def test_output_writes_a_plan_that_validates(repo_root, tmp_path, capsys):
    target = tmp_path / "plan.json"
    spec = f"{repo_root}/configs/feed_ranker.py:size=small"
    assert main(["plan", "--config", spec, "--output", str(target)]) == 0
    assert f"plan written to {target}" in capsys.readouterr().out
    plan = json.loads(target.read_text())
    assert set(plan) == {"member", "hashtag", "post", "position"}
    tables, _, _ = specs_from_config(load_config(spec).embedding)
    mesh = make_mesh({"data": 2, "model": 4})
    validated = validate_plan(load_plan(target), {t.name: t for t in tables}, mesh)
    assert validated["member"] == {"strategy": "row_wise", "axes": ("model",)}


def test_hand_plan_override_from_the_command_line(repo_root, capsys):
    assert (
        main(
            [
                "plan",
                "--config",
                f"{repo_root}/configs/feed_ranker.py:size=tiny",
                "--config.embedding.memory_budget_bytes=30000000",
            ]
        )
        == 0
    )
    assert "budget 30 MB per device" in capsys.readouterr().out


def test_impossible_budget_exits_2_with_one_line(repo_root, capsys, tmp_path):
    target = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--config",
                f"{repo_root}/configs/feed_ranker.py:size=large",
                "--config.embedding.memory_budget_bytes=1000000",
                "--output",
                str(target),
            ]
        )
        == 2
    )
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("lf-jax plan: error: table 'member' (260 MB, 260000260 bytes")
    assert "budget of 1 MB (1000000 bytes)" in err
    assert not target.exists() and captured.out == ""


def test_output_in_a_missing_directory_fails_first(repo_root, tmp_path, capsys):
    assert (
        main(
            [
                "plan",
                "--config",
                f"{repo_root}/configs/feed_ranker.py:size=tiny",
                "--output",
                str(tmp_path / "no" / "plan.json"),
            ]
        )
        == 2
    )
    assert "--output" in capsys.readouterr().err


def test_config_without_embedding_is_one_error(repo_root, capsys):
    assert main(["plan", "--config", f"{repo_root}/configs/demo.py"]) == 2
    assert "has no 'embedding' key" in capsys.readouterr().err


def test_plan_never_starts_a_jax_backend(repo_root):
    code = (
        "from lf_jax.cli import main; import sys\n"
        "rc = main(['plan', '--config', 'configs/feed_ranker.py:size=large',\n"
        "           '--config.mesh.data=8', '--config.devices=64'])\n"
        "from jax._src import xla_bridge\n"
        "print('backend started:', xla_bridge.backends_are_initialized()); sys.exit(rc)"
    )
    env = child_env(CI="true")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=repo_root,
    )
    assert result.returncode == 0, result.stderr
    assert "backend started: False" in result.stdout
