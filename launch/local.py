"""Run a command as N local JAX processes x M simulated CPU devices (a one-machine "cluster").

    python -m launch.local --processes 2 --devices-per-process 4 -- \\
        lf-jax train --config configs/feed_ranker.py:size=tiny --workdir runs/mp

Every process gets LF_JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port),
LF_JAX_NUM_PROCESSES, LF_JAX_PROCESS_ID and its device count, which lf_jax's
multihost.initialize() (the ``lf-jax`` CLI calls it) turns into jax.distributed. Output
lines are prefixed with [pI]. When one process fails, the others get SIGTERM after
--grace seconds (JAX's own failure detection usually stops them sooner) and SIGKILL 10 s
later. SIGTERM or Ctrl-C to the launcher is forwarded to every process (they save a
checkpoint and exit). The exit status is the first failed process's (128+signal for a
signal), else 0; 124 when --timeout stopped the run.
"""

import argparse
import signal
import sys
import threading

from lf_jax.testing.multiprocess import ProcessGroup


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch.local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--processes", "-n", type=int, default=2, help="processes (default 2)")
    parser.add_argument(
        "--devices-per-process",
        "-d",
        type=int,
        default=4,
        help="simulated CPU devices per process (default 4)",
    )
    parser.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=10,
        metavar="S",
        help="a dead process stops the others after about S s (default 10)",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=int,
        default=20,
        metavar="S",
        help="a failed process stops the others after at most S s (default 20)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=None,
        metavar="S",
        help="SIGTERM the survivors S s after a failure (default: heartbeat + 5)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=24 * 3600,
        metavar="S",
        help="stop everything after S s (default one day)",
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        help="the command to run (after --), e.g. lf-jax train ...",
    )
    args = parser.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the command to run after --")
    for name in ("processes", "devices_per_process", "heartbeat_timeout", "shutdown_timeout"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def exit_status(results) -> int:
    """First failure's status (128+N for signal N), 124 for a time-out, else 0."""
    if any(r.stopped_by_limit for r in results):
        return 124
    failed = sorted((r for r in results if r.returncode), key=lambda r: r.elapsed_s)
    if not failed:
        return 0
    code = failed[0].returncode
    return 128 - code if code < 0 else code


def main(argv=None) -> int:
    args = parse_args(argv)

    def echo(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    group = ProcessGroup(
        args.command,
        args.processes,
        args.devices_per_process,
        echo=echo,
        heartbeat_timeout=args.heartbeat_timeout,
        shutdown_timeout=args.shutdown_timeout,
    )
    echo(
        f"[launch] {args.processes} processes x {args.devices_per_process} CPU devices, "
        f"coordinator {group.coordinator}"
    )

    def forward(signum, _frame):
        echo(f"[launch] {signal.Signals(signum).name}: forwarding to every process")
        for index in range(args.processes):
            group.send_signal(index, signal.SIGTERM)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
    grace = args.heartbeat_timeout + 5 if args.grace is None else args.grace
    try:
        results = group.wait(args.timeout, stop_others_after_failure=grace)
    finally:
        group.close()
    first = group.first_failure()
    for r in results:
        how = (
            "time limit"
            if r.stopped_by_limit
            else f"exit {r.returncode}" + (f" ({r.signal_name})" if r.signal_name else "")
        )
        echo(f"[launch] process {r.process}: {how} after {r.elapsed_s:.1f} s")
    if first is not None:
        ended = results[first].elapsed_s
        echo(
            f"[launch] process {first} failed first; the others ended "
            f"{max(r.elapsed_s for r in results) - ended:.1f} s later"
        )
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
