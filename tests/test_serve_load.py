"""`xmodal serve` under concurrency: adapters never leak across requests; a bounded load test."""

import threading

import pytest
import torch

pytest.importorskip("fastapi")

from e2e.serve_world import session_world, specs  # noqa: E402
from xmodal.serve.loadtest import live_server, run_load  # noqa: E402

QUERIES = ["the sun rises over the hills", "cars drive through a busy street", "a red square"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return session_world(tmp_path_factory)


@pytest.fixture(scope="module")
def indices(world):
    from xmodal.serve import load_indices

    return load_indices(specs(world))


@pytest.fixture(scope="module")
def server(indices):
    from xmodal.serve import create_app

    with live_server(create_app(indices)) as base:
        yield base


def test_concurrent_encodes_for_different_adapters_never_mix(indices):
    """Threads encoding for adapter A, adapter B and no adapter on ONE backbone each get their own result."""
    by_name = {ix.name: ix for ix in indices}
    shared = by_name["ada"].encoder.shared
    assert all(ix.encoder.shared is shared for ix in indices)  # one backbone in memory
    ref = {(n, q): by_name[n].encoder.encode_text([q])[0] for n in by_name for q in QUERIES}
    assert not torch.allclose(ref[("ada", QUERIES[0])], ref[("adb", QUERIES[0])], atol=1e-3)
    jobs = [(n, q) for _ in range(10) for n in ("ada", "adb", "plain") for q in QUERIES]
    wrong, start = [], threading.Barrier(6)
    switches = shared.switches

    def worker(part):
        start.wait()
        for n, q in part:
            got = by_name[n].encoder.encode_text([q])[0]
            if not torch.equal(got, ref[(n, q)]):
                wrong.append((n, q))

    threads = [threading.Thread(target=worker, args=(jobs[i::6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong[:5]
    assert shared.switches - switches >= 20  # the adapters really were switched back and forth


def test_concurrent_http_searches_on_two_adapters_match_serial_answers(server):
    import httpx

    with httpx.Client(base_url=server, timeout=60) as c:
        ref = {(n, q): c.post("/search", json={"index": n, "query": q, "k": 6}).json()["hits"]
               for n in ("ada", "adb") for q in QUERIES}
    assert [h["score"] for h in ref[("ada", QUERIES[1])]] != [h["score"] for h in ref[("adb", QUERIES[1])]]
    wrong = []

    def worker(i):
        with httpx.Client(base_url=server, timeout=60) as c:
            for j in range(12):
                n, q = ("ada", "adb")[(i + j) % 2], QUERIES[(i * 7 + j) % 3]
                hits = c.post("/search", json={"index": n, "query": q, "k": 6}).json()["hits"]
                if [(h["id"], h["score"]) for h in hits] != [(h["id"], h["score"]) for h in ref[(n, q)]]:
                    wrong.append((n, q))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong[:5]


def test_bounded_load_zero_errors(server, capsys):
    """8 concurrent clients, 200 requests over every kind of endpoint: all answered 2xx."""
    requests = [
        ("POST", "/search", {"index": "ada", "query": "waves roll onto a sandy beach", "k": 5}),
        ("POST", "/knn-service", {"text": "a blue square", "modality": "image", "num_images": 4, "indice_name": "adb"}),
        ("POST", "/knn-service", {"text": "a blue square", "modality": "text", "num_images": 4, "indice_name": "plain"}),
        ("POST", "/metadata", {"indice_name": "plain", "ids": [0, 1, 2]}),
        ("GET", "/thumb/plain/traffic?t=2", None),
        ("GET", "/media/ada/forest", None),
        ("GET", "/indices-list", None),
        ("GET", "/healthz", None),
    ]
    result = run_load(server, requests, total=200, clients=8)
    summary = result.summary()
    with capsys.disabled():
        print(f"\nserve load (200 requests, 8 clients, xmodal-test): {summary}")
    assert result.requests == 200 and result.errors == 0, summary
    assert set(summary["statuses"]) == {"200"}
