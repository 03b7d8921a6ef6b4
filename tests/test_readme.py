"""Executes every README code block that starts with '# runnable', in a fresh process."""

import os
import re
import subprocess
import sys

import pytest

from lf_jax.testing.environment import child_env

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = [
    block
    for block in re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    if block.startswith("# runnable")
]


def test_readme_has_runnable_blocks():
    assert BLOCKS


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    env = child_env()
    result = subprocess.run(
        [sys.executable, "-c", BLOCKS[index]],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
