"""Compiles, caches and registers the fused CPU kernels (every ``*.cc`` beside this file,
linked into one library) with XLA's FFI.

The sources are compiled once per machine, at first use, with the C++ compiler ``$CXX``
(default ``g++``) against jaxlib's FFI headers, into a cache directory keyed by the
sources, the flags, the jaxlib version and the CPU's instruction set
(``$LF_JAX_KERNEL_CACHE``, default ``~/.cache/lf_jax/kernels``). An ``fcntl`` lock keeps
concurrent processes (pytest-xdist workers, several trainers) from building it twice;
the library appears by an atomic rename. A missing compiler or a failed build raises
``KernelBuildError``, which names the setting that selects the XLA path instead
(``kernel="xla"``; nothing falls back silently).

Example:
    >>> from lf_jax.embedding.kernels.build import load
    >>> load()  # registers lf_jax_pool, lf_jax_update_{sgd,adagrad,adam} and
    ...         # lf_jax_dynamic_{resolve,find,route} for the CPU
"""

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

from lf_jax.errors import LfJaxError

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cc")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))  # included by the sources
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
# FFI target name -> exported handler symbol in the library
TARGETS = {
    "lf_jax_pool": "LfPool",
    "lf_jax_update_sgd": "LfUpdateSgd",
    "lf_jax_update_adagrad": "LfUpdateAdagrad",
    "lf_jax_update_adam": "LfUpdateAdam",
    "lf_jax_dynamic_resolve": "LfDynamicResolve",
    "lf_jax_dynamic_find": "LfDynamicFind",
    "lf_jax_dynamic_route": "LfDynamicRoute",
    "lf_jax_route": "LfRoute",
    "lf_jax_sum_places": "LfSumPlaces",
    "lf_jax_gather_asked": "LfGatherAsked",
    "lf_jax_pool_parts": "LfPoolParts",
    "lf_jax_bag_layout": "LfBagLayout",
    "lf_jax_pool_to": "LfPoolTo",
    "lf_jax_update_bag_sgd": "LfUpdateBagSgd",
    "lf_jax_update_bag_adagrad": "LfUpdateBagAdagrad",
    "lf_jax_update_bag_adam": "LfUpdateBagAdam",
}
XLA_PATH_HINT = (
    "choose the XLA path instead with EmbeddingCollection(..., kernel='xla') or the "
    "environment variable LF_JAX_EMBEDDING_KERNEL=xla"
)


class KernelBuildError(LfJaxError, RuntimeError):
    """The fused CPU kernel could not be compiled or loaded."""


def cache_dir() -> Path:
    """Where built libraries live: ``$LF_JAX_KERNEL_CACHE`` or ``~/.cache/lf_jax/kernels``."""
    if os.environ.get("LF_JAX_KERNEL_CACHE"):
        return Path(os.environ["LF_JAX_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lf_jax" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags (``-march=native`` builds for them); '' where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def library_path(compiler: str) -> Path:
    """The cached library for these sources, compiler, flags, jaxlib and CPU."""
    key = hashlib.sha256()
    for source in SOURCES + HEADERS:
        key.update(source.name.encode() + b"\0" + source.read_bytes())
    for part in (compiler.encode(), " ".join(FLAGS).encode()):
        key.update(part)
    key.update(f"{jaxlib.__version__} {platform.machine()} {_cpu_flags()}".encode())
    return cache_dir() / f"lf_jax_kernels-{key.hexdigest()[:20]}.so"


def _compile(compiler: str, target: Path) -> None:
    """Builds the library into ``target`` (via a temporary file and a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise KernelBuildError(
                f"building lf_jax's fused CPU embedding kernel failed ({' '.join(command)}):\n"
                f"{result.stderr[-2000:]}\nFix the compiler setup (CXX), or {XLA_PATH_HINT}"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def built_library(compiler: str) -> Path:
    """The cached library for ``compiler`` (a path), built first if missing, under the
    cache directory's lock; an unusable cache directory is a ``KernelBuildError`` naming
    it and ``LF_JAX_KERNEL_CACHE``."""
    target = library_path(compiler)
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = open(target.parent / ".build.lock", "w")
    except OSError as error:
        raise KernelBuildError(
            f"the fused CPU embedding kernel's cache directory {str(target.parent)!r} cannot "
            f"be written ({error}): point LF_JAX_KERNEL_CACHE at a writable directory, or "
            f"{XLA_PATH_HINT}"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not target.exists():
            _compile(compiler, target)
    return target


@functools.cache
def load() -> Path:
    """Builds the library if this machine has none cached, loads it and registers its
    FFI targets for the CPU platform (once per process). Returns the library's path."""
    compiler = os.environ.get("CXX", "g++")
    found = shutil.which(compiler)
    if found is None:
        raise KernelBuildError(
            f"lf_jax's fused CPU embedding kernel needs a C++17 compiler, and '{compiler}' "
            f"(CXX) is not on PATH: install g++ (or set CXX), or {XLA_PATH_HINT}"
        )
    target = built_library(found)
    try:
        library = ctypes.cdll.LoadLibrary(str(target))
    except OSError as error:
        raise KernelBuildError(
            f"loading lf_jax's fused CPU embedding kernel {target} failed ({error}); "
            f"delete it to rebuild, or {XLA_PATH_HINT}"
        ) from None
    for name, symbol in TARGETS.items():
        handler = jax.ffi.pycapsule(getattr(library, symbol))
        jax.ffi.register_ffi_target(name, handler, platform="cpu")
    return target
