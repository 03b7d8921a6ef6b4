"""Start N JAX processes x M simulated CPU devices on this machine, watch them, stop them.

Used by tests, notebooks and launch/local.py. Each process gets the LF_JAX_* variables
that lf_jax.distributed.multihost.initialize() reads (a free coordinator port on
127.0.0.1), ``--xla_force_host_platform_device_count=M`` and JAX_PLATFORMS=cpu. Output
(stdout and stderr together) is collected per process and optionally echoed with a
``[pI]`` prefix. Everything runs under an outer time limit: JAX waits forever for a
process that is alive but stuck.

Example:
    >>> with ProcessGroup([sys.executable, "-m", "lf_jax.cli", "train", ...], 2, 4) as group:
    ...     group.wait_for(r"checkpoint step 2", process=0, timeout=120)
    ...     group.kill(1)
    ...     results = group.wait(timeout=60)
    >>> [r.returncode for r in results]
    [-6, -9]
"""

import dataclasses
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from lf_jax.testing.environment import child_env


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the coordinator binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_env(
    process_id: int,
    num_processes: int,
    devices_per_process: int,
    coordinator: str,
    base: Mapping[str, str] | None = None,
    **settings,
) -> dict[str, str]:
    """The environment of one local worker; ``settings`` become LF_JAX_<NAME> variables,
    e.g. heartbeat_timeout=5 -> LF_JAX_HEARTBEAT_TIMEOUT=5."""
    env = child_env(base)
    flags = env.get("XLA_FLAGS", "")
    env.update(
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip(),
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        LF_JAX_COORDINATOR_ADDRESS=coordinator,
        LF_JAX_NUM_PROCESSES=str(num_processes),
        LF_JAX_PROCESS_ID=str(process_id),
        LF_JAX_CPU_DEVICES=str(devices_per_process),
    )
    env.update({f"LF_JAX_{name.upper()}": str(value) for name, value in settings.items()})
    return env


@dataclasses.dataclass
class ProcessResult:
    process: int
    returncode: int | None  # None: still running when the time limit stopped it
    output: str
    elapsed_s: float
    stopped_by_limit: bool = False

    @property
    def signal_name(self) -> str:
        if self.returncode is not None and self.returncode < 0:
            return signal.Signals(-self.returncode).name
        return ""


class ProcessGroup:
    """N local processes of ``argv`` (a list, or a callable process_id -> list)."""

    def __init__(
        self,
        argv: Sequence[str] | Callable[[int], Sequence[str]],
        num_processes: int,
        devices_per_process: int,
        *,
        env: Mapping[str, str] | None = None,
        echo: Callable[[str], None] | None = None,
        cwd: str | None = None,
        **settings,
    ):
        if num_processes < 1 or devices_per_process < 1:
            raise ValueError(
                f"num_processes={num_processes} and devices_per_process="
                f"{devices_per_process} must be >= 1"
            )
        self.coordinator = f"127.0.0.1:{free_port()}"
        self.num_processes = num_processes
        self._lines: list[list[str]] = [[] for _ in range(num_processes)]
        self._changed = threading.Condition()
        self._echo = echo
        self.start_time = time.monotonic()
        self.end_times: dict[int, float] = {}
        self.procs: list[subprocess.Popen] = []
        for index in range(num_processes):
            args = list(argv(index) if callable(argv) else argv)
            proc_env = worker_env(
                index, num_processes, devices_per_process, self.coordinator, env, **settings
            )
            proc = subprocess.Popen(
                args,
                env=proc_env,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            self.procs.append(proc)
            threading.Thread(target=self._pump, args=(index, proc), daemon=True).start()

    def _pump(self, index: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            with self._changed:
                self._lines[index].append(line)
                self._changed.notify_all()
            if self._echo is not None:
                self._echo(f"[p{index}] {line.rstrip()}")
        proc.wait()
        with self._changed:
            self.end_times[index] = time.monotonic()
            self._changed.notify_all()

    def output(self, process: int) -> str:
        with self._changed:
            return "".join(self._lines[process])

    def wait_for(self, pattern: str, *, process: int | None = None, timeout: float) -> re.Match:
        """Blocks until ``pattern`` appears in a process's output; TimeoutError otherwise
        (also when the watched processes all ended without printing it)."""
        regex = re.compile(pattern)
        watched = range(self.num_processes) if process is None else [process]
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in watched:
                    match = regex.search("".join(self._lines[index]))
                    if match:
                        return match
                if all(index in self.end_times for index in watched):
                    raise TimeoutError(
                        f"{pattern!r} never appeared; processes {list(watched)} ended"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{pattern!r} did not appear within {timeout} s")
                self._changed.wait(min(left, 1.0))

    def send_signal(self, process: int, sig: int = signal.SIGTERM) -> None:
        if self.procs[process].poll() is None:
            self.procs[process].send_signal(sig)

    def kill(self, process: int) -> None:
        self.send_signal(process, signal.SIGKILL)

    def first_failure(self) -> int | None:
        """The process that ended first with a non-zero status, or None."""
        failed = [(t, i) for i, t in self.end_times.items() if self.procs[i].returncode != 0]
        return min(failed)[1] if failed else None

    def wait(
        self, timeout: float, *, stop_others_after_failure: float | None = None
    ) -> list[ProcessResult]:
        """Waits for every process; kills what still runs after ``timeout`` s. With
        ``stop_others_after_failure``, the survivors of a failed process get SIGTERM that
        many seconds after the failure, and SIGKILL 10 s later."""
        deadline = time.monotonic() + timeout
        limited, terminated_at = set(), None
        with self._changed:
            while len(self.end_times) < self.num_processes:
                now = time.monotonic()
                if now >= deadline:
                    break
                failed = self.first_failure()
                if stop_others_after_failure is not None and failed is not None:
                    since = now - self.end_times[failed]
                    if since >= stop_others_after_failure and terminated_at is None:
                        terminated_at = now
                        for index in range(self.num_processes):
                            self.send_signal(index, signal.SIGTERM)
                    if terminated_at is not None and now - terminated_at >= 10:
                        for index in range(self.num_processes):
                            self.kill(index)
                self._changed.wait(0.2)
        for index, proc in enumerate(self.procs):
            if proc.poll() is None:
                limited.add(index)
                self.kill(index)
        for proc in self.procs:
            proc.wait()
        with self._changed:
            while len(self.end_times) < self.num_processes:
                self._changed.wait(0.2)
        return [
            ProcessResult(
                i,
                None if i in limited else proc.returncode,
                self.output(i),
                self.end_times[i] - self.start_time,
                i in limited,
            )
            for i, proc in enumerate(self.procs)
        ]

    def close(self) -> None:
        for index in range(self.num_processes):
            self.kill(index)
        for proc in self.procs:
            proc.wait()

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_processes(
    argv,
    num_processes: int,
    devices_per_process: int,
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
    **settings,
) -> list[ProcessResult]:
    """Runs ``argv`` in N local processes to completion (or ``timeout``); see ProcessGroup."""
    with ProcessGroup(argv, num_processes, devices_per_process, env=env, **settings) as group:
        return group.wait(timeout)


def python_argv(code: str) -> list[str]:
    """[python, -c, code]: the argv of a worker written inline."""
    return [sys.executable, "-c", code]


def restored_arrays(task, workdir, step: int | None = None) -> tuple[dict, dict]:
    """({"params/..": ..., "embedding/..": ...} host arrays, data state) of ``task``'s
    checkpoint under ``workdir`` (``step``, default the latest) restored in this process
    on ``task``'s mesh, tables in logical form: what a multi-process run's worker gathers,
    to compare with."""
    import jax
    import numpy as np

    from lf_jax.train.checkpoint import Checkpointer, flatten_to_dict

    checkpointer = Checkpointer(Path(workdir) / "checkpoints")
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {workdir}/checkpoints")
    state, data_state = checkpointer.restore(step, task.init_state(), task.collection)
    checkpointer.close()
    out = {f"params/{k}": np.asarray(v) for k, v in flatten_to_dict(state["params"]).items()}
    logical = jax.jit(
        task.collection.to_logical, out_shardings=task.collection.logical_shardings()
    )(state["embedding"])
    out.update({f"embedding/{k}": np.asarray(v) for k, v in flatten_to_dict(logical).items()})
    return out, data_state


def train_in_processes(
    worker: str,
    root: Path,
    config: str,
    overrides: Mapping[str, str],
    *,
    processes: int = 2,
    devices: int = 4,
    limit_s: float = 420,
    heartbeat_s: float = 4,
    cwd=None,
) -> tuple[dict, list]:
    """Trains ``config`` with ``--config.<key>=<value>`` ``overrides`` in ``processes`` x
    ``devices`` workers (tests/distributed/mp_train_worker.py: ``worker``), workdir
    ``root``/run, and checks every process ended within ``limit_s`` with exit 0.
    Returns (the final arrays process 0 gathered, ``root``/final.npz; the results with
    each process's output)."""
    import numpy as np

    argv = [
        sys.executable,
        worker,
        str(root),
        "--config",
        config,
        "--workdir",
        str(Path(root) / "run"),
        *[f"--config.{k}={v}" for k, v in overrides.items()],
    ]
    with ProcessGroup(
        argv, processes, devices, env=child_env(CI="true"), cwd=cwd, heartbeat_timeout=heartbeat_s
    ) as group:
        results = group.wait(limit_s)
    for r in results:
        assert not r.stopped_by_limit, f"process {r.process} hung:\n{r.output[-3000:]}"
        assert r.returncode == 0, f"process {r.process}: {r.returncode}\n{r.output[-3000:]}"
    return dict(np.load(Path(root) / "final.npz")), results


def train_in_one_process(config: str, overrides: Mapping[str, str], workdir: Path):
    """Trains ``config`` with ``overrides`` in this process on its mesh (the reference a
    multi-process run is compared with), workdir ``workdir``. Returns (the RankerTask,
    the final arrays and data state as ``restored_arrays`` gives them)."""
    from lf_jax.configuration import apply_overrides, load_config
    from lf_jax.distributed.mesh import make_mesh
    from lf_jax.train.loop import prepare_workdir, run_training
    from lf_jax.train.ranker import RankerTask

    loaded = apply_overrides(load_config(config), overrides)
    task = RankerTask(loaded, make_mesh(dict(loaded.mesh)), prepare_workdir(workdir, loaded))
    run_training(task, loaded.train, workdir)
    return (task, *restored_arrays(task, workdir))


def small_ranker_overrides(data_dir, **extra: str) -> dict[str, str]:
    """``--config.<key>=<value>`` overrides that shrink configs/feed_ranker.py's tiny
    ranker for multi-process tests (batch 64, a 32-unit MLP, one DCN layer, histories of
    10 ids, no IPS, no evaluation, a log line per step, the dataset under ``data_dir``),
    then ``extra`` (e.g. ``**{"train.steps": "4"}``)."""
    return {
        "batch_size": "64",
        "model.mlp_dims": "(32,)",
        "model.dcn_layers": "1",
        "embedding.features.history_actors.max_ids": "10",
        "embedding.features.history_hashtags.max_ids": "10",
        "train.eval_every": "0",
        "train.log_every": "1",
        "train.ips": "false",
        "data.data_dir": str(data_dir),
        **extra,
    }
