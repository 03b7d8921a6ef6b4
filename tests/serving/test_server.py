"""The HTTP server: good and malformed requests, and a hot swap of the artifact version under
load with no failed request."""

import http.client
import json
import os
import threading
import time

import numpy as np
import pytest

from lf_jax.serving.server import serve_in_thread
from lf_jax.serving.service import Service


def _post(port, path, body, method="POST"):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    payload = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    conn.request(method, path, body=payload)
    response = conn.getresponse()
    data = json.loads(response.read() or b"null")
    conn.close()
    return response.status, data


@pytest.fixture(scope="module")
def server(serving_root, export_version):
    """A server over a root with v0001 (served) and v0002 (int8, exported, not current)."""
    root, _ = serving_root
    export_version(root, "int8", "v0002")
    (root / "CURRENT").write_text("v0001\n")  # serve v0001 first; the test switches
    service = Service(root)
    port, stop = serve_in_thread(service, poll_s=0.2)
    yield service, port, root
    stop()
    service.close()


def test_rank_health_and_metrics(server):
    service, port, _ = server
    assert _post(port, "/healthz", None, "GET") == (
        200,
        {"status": "ok", "version": "v0001", "stages": ["rank"]},
    )
    posts = [f"p{i}" for i in range(0, 600, 10)]
    status, out = _post(port, "/v1/rank", {"member_id": "m7", "post_ids": posts, "top_n": 5})
    assert status == 200, out
    assert out["version"] == "v0001" and len(out["post_ids"]) == 5
    assert set(out["post_ids"]) <= set(posts) and out["scores"] == sorted(out["scores"])[::-1]
    weights = service.current.task_weights
    probs = np.array([out["task_probs"][t] for t in service.current.tasks]).T
    np.testing.assert_allclose(probs @ weights, out["scores"], rtol=1e-5)
    status, metrics = _post(port, "/metrics", None, "GET")
    assert status == 200 and metrics["compiles_since_warm_up"] == 0
    assert metrics["latency_ms"]["rank_ms"]["count"] >= 1


@pytest.mark.parametrize(
    "path, body, status, reason",
    [
        ("/v1/rank", b"{not json", 400, "not valid JSON"),
        ("/v1/rank", [1, 2], 400, "must be a JSON object"),
        ("/v1/rank", {"post_ids": ["p1"]}, 400, "member_id must be a non-empty string"),
        ("/v1/rank", {"member_id": "m1", "post_ids": "p1"}, 400, "post_ids must be a list"),
        ("/v1/rank", {"member_id": "m1", "post_ids": ["p1", 3]}, 400, "post_ids must be a list"),
        ("/v1/rank", {"member_id": "m1", "post_ids": ["p1", ""]}, 400, "post_ids must be a list"),
        ("/v1/rank", {"member_id": "m1", "post_ids": ["p1"], "x": 1}, 400, "unknown field"),
        ("/v1/rank", {"member_id": "m1", "post_ids": []}, 400, "1 to 64 posts, got 0"),
        ("/v1/rank", {"member_id": "m1", "post_ids": ["p1"] * 2}, 400, "must not repeat"),
        ("/v1/rank", {"member_id": "m1", "post_ids": ["p1"], "top_n": 0}, 400, "top_n must"),
        ("/v1/rank", {"member_id": "m1", "post_ids": ["p1"], "top_n": True}, 400, "top_n must"),
        ("/v1/rank", {"member_id": "m300", "post_ids": ["p1"]}, 404, "'m300' is not a known"),
        ("/v1/rank", {"member_id": "m1", "post_ids": ["p1", "p1000"]}, 404, "'p1000' is not"),
        ("/v1/feed", {"member_id": "m1", "k": 5}, 404, "stage 'feed' is not served"),
        ("/v1/retrieve", {"member_id": "m1"}, 400, "k (candidates to retrieve) is required"),
        ("/v2/rank", {}, 404, "no such path"),
        ("/healthz", {}, 405, "/healthz takes GET, got POST"),
    ],
)
def test_bad_requests_get_a_4xx_with_the_reason(server, path, body, status, reason):
    _, port, _ = server
    got, out = _post(port, path, body)
    assert got == status and reason in out["error"], out


def test_hot_swap_under_load_drops_no_request(server):
    service, port, root = server
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def client(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            posts = [f"p{i}" for i in rng.choice(1000, 40, replace=False)]
            body = {"member_id": f"m{rng.integers(300)}", "post_ids": posts, "top_n": 3}
            status, out = _post(port, "/v1/rank", body)
            results.append((status, out.get("version", out.get("error"))))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    tmp = root / ".CURRENT.test"
    tmp.write_text("v0002\n")
    os.replace(tmp, root / "CURRENT")  # what `lf-jax export --serving` does last
    deadline = time.time() + 300
    while time.time() < deadline and not any(v == "v0002" for _, v in results[-4:]):
        time.sleep(0.5)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join(120)
    statuses = {s for s, _ in results}
    versions = [v for _, v in results]
    assert statuses == {200}, [r for r in results if r[0] != 200][:3]
    assert versions[0] == "v0001" and versions[-1] == "v0002"
    assert versions.index("v0002") > 0 and "v0001" not in versions[versions.index("v0002") + 8 :]
    swap = service.metrics()["swaps"][-1]
    assert swap["previous"] == "v0001" and swap["version"] == "v0002"
    assert service.current.models["ranker"].manifest["table_dtype"] == "int8"
    assert service.metrics()["compiles_since_warm_up"] == 0
    assert max(int(size) for size in service.metrics()["batches"]) >= 2  # requests batched
