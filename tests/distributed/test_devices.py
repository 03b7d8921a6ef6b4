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


_MMAPPED_BYTES = """
    import ctypes, os, sys
    import lf_jax

    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    before = libc.mallinfo2().hblkhd
    block = libc.malloc(64 << 20)
    print(libc.mallinfo2().hblkhd - before)
    libc.free(block)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc only")
@pytest.mark.parametrize(("choice", "mmapped"), [("keep", False), ("default", True)])
def test_import_keeps_large_blocks_off_mmap(choice, mmapped):
    """import lf_jax turns off glibc's mmap for large blocks; LF_JAX_MALLOC=default opts out."""
    assert (_printed_int(_MMAPPED_BYTES, choice) >= 64 << 20) is mmapped


def _printed_int(code: str, malloc_choice: str) -> int:
    """What ``code`` prints, run in a fresh process with LF_JAX_MALLOC=malloc_choice."""
    import os

    env = {"PATH": "/usr/bin:/bin", "LF_JAX_MALLOC": malloc_choice}
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


def test_bad_malloc_choice_names_the_variable(monkeypatch):
    from lf_jax.distributed.devices import keep_freed_memory
    from lf_jax.errors import UserInputError

    monkeypatch.setenv("LF_JAX_MALLOC", "off")
    with pytest.raises(UserInputError, match="LF_JAX_MALLOC='off'"):
        keep_freed_memory()


_THREAD_HEAP_REFAULTS = """
    import ctypes, resource, threading
    import lf_jax

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 40 << 20
    faults = []

    def touch(block):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        ctypes.memset(block, 1, size)
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

    def work():
        first = libc.malloc(size)  # the thread arena's first heap
        second = libc.malloc(size)  # does not fit there: a second heap
        touch(second)
        libc.free(second)  # that heap is wholly free now
        again = libc.malloc(size)
        faults.append(touch(again))
        libc.free(again)
        libc.free(first)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    print(faults[0])
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc malloc only")
@pytest.mark.parametrize(("choice", "kept"), [("keep", True), ("default", False)])
def test_import_keeps_thread_heaps_mapped(choice, kept):
    """A thread (as XLA's device threads) that frees a block filling a heap of its arena
    gets it back without page faults after import lf_jax: glibc would unmap the wholly
    free heap (10,240 faults for 40 MiB measured before M_TOP_PAD was set);
    LF_JAX_MALLOC=default opts out."""
    faults = _printed_int(_THREAD_HEAP_REFAULTS, choice)
    assert (faults < 100) is kept, faults
