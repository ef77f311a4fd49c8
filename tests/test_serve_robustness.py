"""`xmodal serve` under hostile input: schema fuzzing (no 5xx), path traversal, symlinks."""

import http.client
import os
import shutil

import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from e2e.serve_world import build_index, make_media, session_world, specs  # noqa: E402
from xmodal.serve.loadtest import live_server  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return session_world(tmp_path_factory)


@pytest.fixture(scope="module")
def app(world):
    from xmodal.serve import build_app

    return build_app(specs(world))


# ----------------------------------------------------------------------------- schema fuzzing
MAX_EXAMPLES = 30  # per operation and generation mode: bounded, the whole fuzz stays well under a minute


def _server_errors(app, max_examples=MAX_EXAMPLES, pinned_path=None):
    """Fuzz every operation of the app's /openapi.json (valid and invalid requests); list the 5xx answers."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.core.result import Ok

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, calls = [], {"n": 0}
    operations = [op.ok() for op in schema.get_all_operations() if isinstance(op, Ok)]
    for op in operations:
        runs = [dict(generation_mode=m) for m in GenerationMode]
        if pinned_path and "{item_id}" in op.path:  # also fuzz the query of a real item, not only unknown ids
            runs.append(dict(generation_mode=GenerationMode.POSITIVE, path_parameters=pinned_path))
        for kwargs in runs:
            @given(case=op.as_strategy(**kwargs))
            @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None)
            def fuzz(case):
                calls["n"] += 1
                try:
                    response = case.call()
                except Exception as exc:  # the ASGI transport re-raises what the app did not handle
                    failures.append((case.method, case.formatted_path, case.query, case.body, 500, repr(exc)))
                    return
                if response.status_code >= 500:
                    failures.append((case.method, case.formatted_path, case.query, case.body,
                                     response.status_code, response.text[:200]))

            try:
                fuzz()
            except Unsatisfiable:  # e.g. no invalid request exists for an operation without parameters
                assert kwargs["generation_mode"] == GenerationMode.NEGATIVE, (op.label, kwargs)
    return failures, calls["n"], len(operations)


def test_no_request_produces_a_server_error(app):
    """schemathesis against /openapi.json: valid and invalid requests to every operation, never a 5xx."""
    failures, calls, operations = _server_errors(app, pinned_path={"index": "plain", "item_id": "sunrise"})
    assert operations >= 8 and calls >= operations * MAX_EXAMPLES // 2
    assert not failures, failures[:5]


def test_the_fuzzer_finds_a_server_error_when_there_is_one():
    """The harness above can fail: an endpoint that crashes on some valid input is caught."""
    from fastapi import FastAPI
    from pydantic import BaseModel

    class Body(BaseModel):
        n: int

    toy = FastAPI()

    @toy.post("/div")
    def div(body: Body):
        return {"x": 100 // (body.n % 2)}  # ZeroDivisionError -> 500 for every even n

    failures, _, _ = _server_errors(toy, max_examples=50)
    assert failures and failures[0][4] == 500


# ----------------------------------------------------------------------------- traversal
SECRET = b"top secret, never served"


@pytest.fixture(scope="module")
def server(app):
    with live_server(app) as base:
        yield base


def _raw_get(base, path):
    """GET with the path sent byte for byte (no client-side normalisation of `..` or `%2e`)."""
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path", [
    "/media/plain/../../../../etc/passwd",
    "/media/plain/..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/media/plain/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/media/plain/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
    "/media/plain//etc/passwd",
    "/media/plain/%2Fetc%2Fpasswd",
    "/media/%2e%2e/sunrise",
    "/media/../media/plain/sunrise/../../../../etc/passwd",
    "/thumb/plain/..%2f..%2fsecret.txt",
    "/thumb/plain//etc/passwd?t=0",
    "/static/../app.py",
    "/static/..%2fapp.py",
    "/static/%2e%2e/%2e%2e/catalog.py",
    "/media/plain/sunrise%00.webm",
])
def test_traversal_is_refused(server, world, path):
    # a file beside the media folder that a traversal would reach
    (world["media"].parent / "secret.txt").write_bytes(SECRET)
    status, body = _raw_get(server, path)
    assert status in (400, 403, 404), (path, status)
    assert SECRET not in body and b"root:" not in body and b"import" not in body


def test_registered_symlink_leaving_the_media_root_is_refused(tmp_path):
    from xmodal.serve import build_app

    outside = make_media(tmp_path / "outside")  # real videos, but outside the served folder
    inside = tmp_path / "served"
    inside.mkdir()
    shutil.copy(outside["sunrise"], inside / "sunrise.webm")
    os.symlink(outside["ocean"], inside / "ocean.webm")  # registered item, symlink leading out
    build_index(tmp_path / "idx", {"sunrise": str(inside / "sunrise.webm"), "ocean": str(inside / "ocean.webm")},
                captions=False)
    with TestClient(build_app([str(tmp_path / "idx")])) as c:
        assert c.get("/media/idx/sunrise").status_code == 200
        for url in ("/media/idx/ocean", "/thumb/idx/ocean?t=1"):
            r = c.get(url)
            assert r.status_code == 403 and "outside the media root" in r.json()["detail"]
    # an explicit, narrower media root refuses everything outside it
    (inside / "sub").mkdir()
    with TestClient(build_app([str(tmp_path / "idx")], media_root=str(inside / "sub"))) as c:
        assert c.get("/media/idx/sunrise").status_code == 403


def test_missing_media_file_is_404_not_500(tmp_path):
    from xmodal.serve import build_app

    media = make_media(tmp_path / "m")
    build_index(tmp_path / "idx", {"forest": media["forest"], "red-square": media["red-square"]}, captions=False)
    os.remove(media["forest"])
    with TestClient(build_app([str(tmp_path / "idx")])) as c:
        for url in ("/media/idx/forest", "/thumb/idx/forest"):
            r = c.get(url)
            assert r.status_code == 404 and "missing on the server" in r.json()["detail"]
        # search still answers; the item without a readable file simply has no moments
        r = c.post("/search", json={"index": "idx", "query": "wind", "k": 2})
        assert r.status_code == 200
        forest = [h for h in r.json()["hits"] if h["id"] == "forest"][0]
        assert forest["moments"] is None
