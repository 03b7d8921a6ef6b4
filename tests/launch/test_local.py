"""launch/local.py: prefixed output, one failure stops the rest, exit status propagated."""

import subprocess
import sys
import time

WORKER = (
    "import os, sys, time; p = int(os.environ['LF_JAX_PROCESS_ID']); "
    "print('hello from', p, os.environ['LF_JAX_NUM_PROCESSES'], "
    "os.environ['XLA_FLAGS'].split('=')[-1], flush=True); "
    "time.sleep(0.5 if p == 1 else 120); sys.exit(3 if p == 1 else 0)"
)


def _launch(repo_root, *args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "launch.local", *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_failure_stops_the_others_and_sets_the_exit_status(repo_root):
    start = time.monotonic()
    result = _launch(
        repo_root, "-n", "2", "-d", "3", "--grace", "1", "--", sys.executable, "-c", WORKER
    )
    took = time.monotonic() - start
    assert result.returncode == 3, result.stdout + result.stderr
    assert "[p0] hello from 0 2 3" in result.stdout and "[p1] hello from 1 2 3" in result.stdout
    assert "[launch] process 1 failed first" in result.stdout
    assert "[launch] process 0: exit -15 (SIGTERM)" in result.stdout
    assert took < 30  # not the 120 s sleep of process 0


def test_all_succeed_and_bad_arguments(repo_root):
    ok = _launch(repo_root, "-n", "3", "--", sys.executable, "-c", "print('ok')")
    assert ok.returncode == 0 and ok.stdout.count("ok") == 3
    assert "[launch] process 2: exit 0" in ok.stdout
    bad = _launch(repo_root, "-n", "0", "--", "true")
    assert bad.returncode == 2 and "--processes must be >= 1" in bad.stderr
    empty = _launch(repo_root, "-n", "2")
    assert empty.returncode == 2 and "give the command" in empty.stderr


def test_time_limit_gives_124(repo_root):
    result = _launch(
        repo_root,
        "-n",
        "1",
        "--timeout",
        "2",
        "--",
        sys.executable,
        "-c",
        "import time; time.sleep(60)",
    )
    assert result.returncode == 124 and "time limit" in result.stdout
