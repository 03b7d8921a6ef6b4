"""CPU of `lf-jax serve`'s HTTP loop thread per request (server.py alone, no model work).

Command (A/B: run it under each tree's PYTHONPATH, alternating; the machine is shared, so
thread CPU time, not wall):
    PYTHONPATH=. .venv/bin/python bench/serving_http.py --requests 300 --rounds 4
    PYTHONPATH=. .venv/bin/python bench/serving_http.py --artifacts /tmp/sb --requests 200

``serve_in_thread`` serves a stub Service whose worker thread answers each request at once
with a feed-sized answer (10 posts, 5 tasks), or, with ``--artifacts``, the real Service
(the worker then competes for the GIL, as in `lf-jax serve`). A client subprocess sends
``--requests`` keep-alive requests one after another (feed: k = 2000; rank: 2,000 named
posts of 20,000), prepared before the clock starts; the figure is the HTTP thread's CPU
time (``time.pthread_getcpuclockid``) divided by the requests.
"""

import argparse
import os
import queue
import subprocess
import sys
import threading
import time

from lf_jax.serving.server import serve_in_thread

TASKS = ["click", "like", "comment", "share", "dwell"]
ANSWER = {
    "post_ids": [f"p{i}" for i in range(10)],
    "scores": [0.5 - i / 100 for i in range(10)],
    "task_probs": {t: [0.1 * i / 3 for i in range(10)] for t in TASKS},
    "version": "v0001",
    "timings_ms": {"queue": 0.1, "features": 0.2, "retrieve": 1.3, "rank": 8.1, "total": 9.9},
}

CLIENT = r"""
import http.client, json, sys
import numpy as np
port, stage, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(0)
bodies = []
for i in range(n):
    body = {"member_id": f"m{i % 300}"}
    if stage == "rank":
        body.update(post_ids=[f"p{j}" for j in rng.choice(20000, 2000, replace=False)], top_n=10)
    else:
        body.update(k=2000, top_n=10)
    bodies.append(json.dumps(body))
conn = http.client.HTTPConnection("127.0.0.1", port)
sys.stdin.readline()
for body in bodies:
    conn.request("POST", f"/v1/{stage}", body=body)
    response = conn.getresponse()
    data = response.read()
    assert response.status == 200, data
print("done", flush=True)
"""


class _Current:
    name = "v0001"

    def stages(self) -> list[str]:
        return ["retrieve", "rank", "feed"]


class StubService:
    """What server.py reads of a Service; its worker answers every request with ANSWER."""

    current = _Current()
    root = "/nonexistent"

    def __init__(self):
        self.requests: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def submit(self, request):
        self.requests.put(request)
        return request.future

    def _run(self) -> None:
        while True:
            self.requests.get().future.set_result(dict(ANSWER))

    def metrics(self) -> dict:
        return {}

    def refresh_features(self) -> bool:
        return False


def http_thread_cpu() -> float:
    thread = next(t for t in threading.enumerate() if t.name == "lf_jax-http")
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def cell(service, stage: str, requests: int) -> float:
    """HTTP-thread CPU ms per request over ``requests`` sequential requests."""
    port, stop = serve_in_thread(service, poll_s=1e6)
    args = [sys.executable, "-c", CLIENT, str(port), stage, str(requests)]
    client = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    time.sleep(0.05)
    start = http_thread_cpu()
    client.stdin.write("go\n")
    client.stdin.flush()
    done = client.stdout.readline()
    cpu = http_thread_cpu() - start
    client.wait()
    stop()
    if not done.startswith("done"):
        raise RuntimeError(f"the {stage} client failed (exit {client.returncode})")
    return 1e3 * cpu / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--artifacts", help="serve this artifacts root (the real Service)")
    args = parser.parse_args()
    service = StubService()
    if args.artifacts:
        import jax

        from lf_jax.serving.service import Service

        jax.config.update("jax_cpu_enable_async_dispatch", False)  # as `lf-jax serve`
        service = Service(args.artifacts)
    print(f"load {os.getloadavg()}")
    for round_ in range(args.rounds):
        for stage in ("feed", "rank"):
            ms = cell(service, stage, args.requests)
            print(f"round {round_} {stage}: HTTP thread {ms:.3f} CPU ms/request", flush=True)
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
