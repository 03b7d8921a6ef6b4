"""Executes notebooks/*.ipynb in a fresh kernel: any cell error fails the suite.

The kernel is a new process started without the suite's 8-device XLA flag, so each
notebook's first cell (``lf_jax.simulate_cpu_devices(8)``) has to set up the mesh
itself. Temporary files (workdirs, indexes) go under ``tmp_path`` through TMPDIR, and
the quickstart reads the tiny feed_logs dataset the session already built
(TFDS_DATA_DIR), so nothing is written to the home directory or the checkout.
"""

import json
import re
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from lf_jax.testing.environment import child_env

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT_S = 600
MAX_STORED_BYTES = 1_000_000


def kernel_env(tmp_path: Path, data_dir: str, xla_defaults: bool) -> dict[str, str]:
    """``xla_defaults``: the kernel compiles with XLA's default flags instead of the
    suite's fast-compile ones; a notebook whose time is running steps rather than compiling
    them (own_data.ipynb: 450 Ranker steps, 0.16 CPU s each at -O0, 0.04 with the defaults)
    runs faster that way."""
    env = child_env(drop=("XLA_FLAGS",) if xla_defaults else ())
    env["TMPDIR"] = str(tmp_path)
    env["TFDS_DATA_DIR"] = data_dir
    env["CI"] = "true"  # no progress bars
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    return env


def execute(
    name: str, tmp_path: Path, data_dir: str, xla_defaults: bool = False
) -> tuple[nbformat.NotebookNode, float]:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in notebook.cells:  # run from a clean slate, not the stored outputs
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    start = time.perf_counter()
    try:
        # CellExecutionError on any error
        client.execute(env=kernel_env(tmp_path, data_dir, xla_defaults))
    finally:
        nbformat.write(notebook, tmp_path / name)  # the executed copy, for debugging
    return notebook, time.perf_counter() - start


def stdout_of(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "stream"
    )


def images_of(notebook) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


@pytest.mark.slow
def test_sharding_notebook_runs(tmp_path, feed_data_dir):
    notebook, seconds = execute("sharding.ipynb", tmp_path, str(feed_data_dir))
    text = stdout_of(notebook)
    assert "over 8 cpu device(s)" in text
    assert text.count("== oracle") == 6, text  # every strategy matched the numpy oracle
    assert images_of(notebook) == 2  # ownership picture + memory bars
    print(f"sharding.ipynb executed in {seconds:.1f} s")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, feed_builder, feed_data_dir):
    notebook, seconds = execute("quickstart.ipynb", tmp_path, str(feed_data_dir))
    text = stdout_of(notebook)
    assert "over 8 cpu device(s)" in text
    assert "recall@10 against exact search" in text
    assert images_of(notebook) == 1  # smoothed loss and holdout AUC vs oracle AUC
    workdirs = list(tmp_path.glob("lf_jax_quickstart_*"))
    assert len(workdirs) == 1, workdirs  # written under tmp_path, nowhere else
    history = [
        json.loads(line) for line in (workdirs[0] / "history.jsonl").read_text().splitlines()
    ]
    assert max(row["step"] for row in history) == 60
    assert (workdirs[0] / "post_index" / "manifest.json").is_file()
    print(f"quickstart.ipynb executed in {seconds:.1f} s")


@pytest.mark.slow
def test_own_data_notebook_trains_saves_loads_and_scores(tmp_path):
    notebook, seconds = execute(
        "own_data.ipynb", tmp_path, str(tmp_path / "tfds"), xla_defaults=True
    )
    text = stdout_of(notebook)
    assert "over 8 cpu device(s)" in text
    found = re.search(r"held-out AUC ([\d.]+), oracle AUC ([\d.]+).* alone: AUC ([\d.]+)", text)
    auc, oracle, dense_only = (float(x) for x in found.groups())
    assert dense_only + 0.1 < auc < oracle, text  # the id embeddings were learned
    assert "['params.npz', 'ranker.json', 'tables.npz']" in text
    assert images_of(notebook) == 1  # the smoothed loss
    assert not (tmp_path / "tfds").exists()  # no dataset builder involved
    user_code = [  # train, save, load and score (the data is built in cells before)
        cell.source
        for cell in notebook.cells
        if cell.cell_type == "code" and ("lf_jax.Ranker(" in cell.source or ".load(" in cell.source)
    ]
    assert len([line for src in user_code for line in src.splitlines() if line.strip()]) < 20
    print(f"own_data.ipynb executed in {seconds:.1f} s")


@pytest.mark.parametrize("name", ["quickstart.ipynb", "sharding.ipynb", "own_data.ipynb"])
def test_stored_notebook_has_outputs_and_no_errors(name):
    """Readers see the plots on GitHub: notebooks are stored executed, small, error-free."""
    path = NOTEBOOKS / name
    assert path.stat().st_size < MAX_STORED_BYTES, f"{name}: {path.stat().st_size} bytes"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code), f"{name} is not fully executed"
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert images_of(notebook) >= 1
    first = code[0].source
    assert "lf_jax.simulate_cpu_devices(8)" in first, f"{name}: the first cell must set the devices"
