"""The built wheel carries everything ``lf-jax`` needs: installed into a fresh venv, run from
a directory outside the checkout, it plans with a packaged config and trains 6 steps.

The venv gets the wheel only (``--no-deps --no-index``); its dependencies come from the
suite's own site-packages through a ``.pth`` line (no download; the editable install of
the checkout is not activated there, since .pth files of an added path are not run).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from lf_jax.testing.environment import child_env

pytestmark = pytest.mark.slow


def _run(argv, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{argv[:3]} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def installed(repo_root, tmp_path_factory):
    """(venv/bin, env, cwd): the wheel installed in a fresh venv, a clean environment and a
    working directory outside the checkout."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # setuptools writes build/ next to the sources: not in the checkout
    shutil.copytree(
        Path(repo_root) / "lf_jax", source / "lf_jax", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(Path(repo_root) / name, source / name)
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(source)])
    (wheel,) = dist.glob("lf_jax-*.whl")
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
        + ["--no-deps", "--no-index", str(wheel)]
    )
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    deps = Path(jax.__file__).resolve().parents[1]
    (Path(site.stdout.strip()) / "lf_jax_test_deps.pth").write_text(f"{deps}\n")
    env = child_env(drop=("PYTHONPATH",))
    cwd = root / "elsewhere"
    cwd.mkdir()
    return venv / "bin", env, cwd


def test_wheel_holds_configs_builders_and_py_typed(installed):
    bin_dir, env, cwd = installed
    code = (
        "import lf_jax, lf_jax.data.feed_logs.simulator, pathlib\n"
        "from lf_jax.input.datasets import builder_class\n"
        "root = pathlib.Path(lf_jax.__file__).parent\n"
        "print(root)\n"
        "print(sorted(p.name for p in (root / 'configs').glob('*.py')))\n"
        "print((root / 'py.typed').is_file(), builder_class('feed_logs').name)\n"
        "kernels = root / 'embedding' / 'kernels'\n"
        "print(sorted(p.name for p in kernels.glob('*.[ch]*') if p.suffix in ('.cc', '.h')))\n"
    )
    out = _run([str(bin_dir / "python"), "-c", code], env=env, cwd=cwd).stdout.splitlines()
    assert out[0].startswith(str(bin_dir.parent)), out  # the wheel's copy, not the checkout
    assert "feed_ranker.py" in out[1] and "demo.py" in out[1]
    assert out[2] == "True feed_logs"
    # the fused CPU kernels' sources and headers (every one of the checkout's), compiled
    # at first use
    checkout = Path(__file__).parents[1] / "lf_jax" / "embedding" / "kernels"
    shipped = sorted(p.name for p in checkout.iterdir() if p.suffix in (".cc", ".h"))
    assert "divide.h" in shipped and "route.cc" in shipped
    assert out[3] == str(shipped)


def test_installed_lf_jax_plans_and_trains_outside_the_checkout(
    installed, feed_builder, feed_data_dir
):
    bin_dir, env, cwd = installed
    plan = _run(
        [str(bin_dir / "lf-jax"), "plan", "--config", "feed_ranker:size=large"]
        + ["--config.mesh.data=8", "--config.devices=64"],
        env=env,
        cwd=cwd,
    )
    assert "(64 devices)" in plan.stdout and "max per device" in plan.stdout, plan.stdout
    train = _run(
        [str(bin_dir / "lf-jax"), "train", "--config", "feed_ranker:size=tiny"]
        + ["--config.train.steps=6", "--config.train.eval_every=6", "--config.batch_size=64"]
        + ["--config.data.eval_examples=10000"]
        + [f"--config.data.data_dir={feed_data_dir}", "--workdir", "run"],
        env={**env, "CI": "true"},
        cwd=cwd,
    )
    rows = (cwd / "run" / "history.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in rows]
    # intervals scaled with train.steps (800 -> 20): log every 80 -> 2, eval every 400 -> 10
    assert [row["step"] for row in history if "loss" in row] == [1, 2, 3, 4, 5, 6]
    assert [row["step"] for row in history if "loss" not in row] == [6]
    assert "holdout_random" in train.stdout
    assert json.loads((cwd / "run" / "config.json").read_text())["train"]["steps"] == 6
