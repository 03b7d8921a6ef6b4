import subprocess
import sys
import textwrap

import pytest

from lf_jax.distributed.devices import DeviceSetupError, simulate_cpu_devices


def _run(code: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_simulate_in_fresh_process_gives_requested_count():
    result = _run("""
        import lf_jax, jax
        print(lf_jax.simulate_cpu_devices(4), jax.device_count())
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4", "4"]


def test_simulate_after_start_with_same_count_is_fine():
    assert simulate_cpu_devices(8) == 8


def test_simulate_after_start_with_other_count_fails_clearly():
    with pytest.raises(DeviceSetupError, match=r"already started with 8 cpu device"):
        simulate_cpu_devices(4)


@pytest.mark.parametrize("count", [0, -1, 2.0, True])
def test_bad_counts(count):
    with pytest.raises(ValueError, match="positive int"):
        simulate_cpu_devices(count)
