"""`xmodal serve`: every endpoint through FastAPI's TestClient on a generated world.

The world (tests/e2e/serve_world.py): 4 generated videos + 2 images, three indices on one
`xmodal-test` backbone (random weights) — no adapter, adapter A, adapter B.
"""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from e2e.serve_world import CAPTIONS, HEAD, IMAGES, VIDEOS, make_backbone, session_world, specs  # noqa: E402
from videos import palette, palette_index  # noqa: E402


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return session_world(tmp_path_factory)


@pytest.fixture(scope="module")
def client(world):
    from xmodal.serve import build_app

    with TestClient(build_app(specs(world))) as c:
        yield c


def _reference_model(world, name):
    from xmodal.methods import AdaptedModel

    model = AdaptedModel(make_backbone())
    if name != "plain":
        model.load_adapter(world["media"].parent / "adapters" / name[-1])
    return model


def _brute_force(world, name, text):
    """Scores of every item under the index's head, computed without the service."""
    from xmodal.encoding import encode_texts
    from xmodal.engine.heads import SimilarityHead
    from xmodal.retrieval_index import GalleryIndex

    index = GalleryIndex.load(world[name])
    q = encode_texts(_reference_model(world, name), [text], max_words=32, progress=False)
    scores = SimilarityHead(**HEAD)(q, index.frame_features.float(), index.frame_mask)[0]
    return index, q[0], scores


def _b64_png(rgb, size=40):
    arr = np.zeros((size, size, 3), np.uint8)
    arr[8:32, 8:32] = rgb
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------- listing / health
def test_indices_list_health_and_shared_backbone(client):
    assert client.get("/indices-list").json() == ["plain", "ada", "adb"]
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["backbones"] == 1  # three indices, one backbone in memory
    assert {d["name"]: d["items"] for d in health["indices"]} == {"plain": 6, "ada": 6, "adb": 6}
    assert all(d["captions"] for d in health["indices"])


# ----------------------------------------------------------------------------- /search
@pytest.mark.parametrize("name", ["plain", "ada", "adb"])
def test_search_ranks_like_brute_force_with_the_index_adapter(client, world, name):
    text = "cars drive through a busy street"
    index, _, scores = _brute_force(world, name, text)
    r = client.post("/search", json={"index": name, "query": text, "k": 6, "exact": True})
    assert r.status_code == 200, r.text
    body = r.json()
    want = [index.ids[i] for i in torch.argsort(scores, descending=True).tolist()]
    assert [h["id"] for h in body["hits"]] == want
    assert [h["score"] for h in body["hits"]] == pytest.approx(sorted(scores.tolist(), reverse=True), abs=1e-5)
    assert body["pooling"] == "text_conditioned" and body["exact"] is True
    assert "recorded fps=1" in body["frame_times"]
    # two-stage search with every item as a candidate gives the same ranking
    two_stage = client.post("/search", json={"index": name, "query": text, "k": 3, "candidates": 6}).json()
    assert [h["id"] for h in two_stage["hits"]] == want[:3]


def test_adapters_change_results(client):
    got = {n: client.post("/search", json={"index": n, "query": "a red square", "k": 6, "exact": True}).json()
           for n in ("plain", "ada", "adb")}
    scores = {n: [h["score"] for h in got[n]["hits"]] for n in got}
    assert scores["plain"] != pytest.approx(scores["ada"], abs=1e-4)
    assert scores["ada"] != pytest.approx(scores["adb"], abs=1e-4)


def test_moments_are_the_pooling_weights_at_the_sampled_times(client, world):
    from xmodal.data.media import decode_frames
    from xmodal.engine.heads import SimilarityHead

    text = "waves roll onto a sandy beach"
    index, q, _ = _brute_force(world, "ada", text)
    body = client.post("/search", json={"index": "ada", "query": text, "k": 6, "exact": True}).json()
    seen_video = False
    for hit in body["hits"]:
        row = index.ids.index(hit["id"])
        if hit["kind"] == "image":
            assert hit["moments"] is None and hit["best_time"] is None
            continue
        seen_video = True
        times = [m["time"] for m in hit["moments"]]
        weights = torch.tensor([m["weight"] for m in hit["moments"]])
        # the times are those of the frames the loader really decodes
        decoded = decode_frames(index.media[row], fps=1.0, num_frames=4).timestamps
        assert times == pytest.approx(decoded, abs=1e-6)
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-5)
        assert hit["best_time"] == times[int(torch.argmax(weights))]
        # the weighted frame average is the vector the head scores: cos(q, sum w f) == hit score
        frames = index.frame_features[row, : len(times)].float()
        pooled = (weights[:, None] * frames).sum(0)
        assert float(torch.nn.functional.cosine_similarity(pooled, q, dim=0)) == pytest.approx(hit["score"], abs=1e-4)
        assert hit["score"] == pytest.approx(
            float(SimilarityHead(**HEAD)(q[None], index.frame_features[row:row + 1].float(),
                                         index.frame_mask[row:row + 1])[0, 0]), abs=1e-5)
    assert seen_video


def test_moment_times_of_clips_shorter_than_the_frame_budget(tmp_path, world):
    """8-frame budget, 4-7 s videos: every grid point is kept, times k/fps without opening the file."""
    from xmodal.data.media import decode_frames
    from e2e.serve_world import build_index
    from xmodal.serve import build_app

    media = {k: str(world["media"] / f"{k}.webm") for k in VIDEOS}
    build_index(tmp_path / "long", media, captions=False, num_frames=8)
    with TestClient(build_app([str(tmp_path / "long")])) as c:
        hits = c.post("/search", json={"index": "long", "query": "x", "k": 4}).json()["hits"]
    for hit in hits:
        decoded = decode_frames(media[hit["id"]], fps=1.0, num_frames=8).timestamps
        assert len(decoded) < 8 and [m["time"] for m in hit["moments"]] == pytest.approx(decoded, abs=1e-6)


def test_moment_times_of_segments_are_times_in_the_file(tmp_path, world):
    """Items that are segments of a file ([start, end] recorded): moments are times in the whole file."""
    from xmodal.data.media import decode_frames
    from e2e.serve_world import build_index
    from xmodal.serve import build_app

    ocean = str(world["media"] / "ocean.webm")
    media = {"long-part": ocean, "short-part": ocean.replace("ocean", "sunrise")}
    segments = {"long-part": (2.0, 6.5), "short-part": (1.0, 3.0)}  # 5 grid points > 4 frames; 2 < 4
    build_index(tmp_path / "seg", media, captions=False, segments=segments)
    with TestClient(build_app([str(tmp_path / "seg")])) as c:
        body = c.post("/search", json={"index": "seg", "query": "x", "k": 2}).json()
    assert "whole files" not in body["frame_times"]
    for hit in body["hits"]:
        start, end = segments[hit["id"]]
        decoded = decode_frames(media[hit["id"]], fps=1.0, num_frames=4, start=start, end=end).timestamps
        assert [m["time"] for m in hit["moments"]] == pytest.approx(decoded, abs=1e-6)
        assert decoded[0] == pytest.approx(start)


def test_search_by_image_finds_the_same_image(client):
    r = client.post("/search", json={"index": "plain", "image": _b64_png(IMAGES["blue-square"]), "k": 2})
    assert r.status_code == 200, r.text
    top = r.json()["hits"][0]
    assert top["id"] == "blue-square" and top["score"] == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- clip-retrieval API
def test_knn_service_matches_search_and_metadata(client):
    text = "the sun rises over the hills"
    # exactly what clip_retrieval.clip_client.ClipClient sends
    body = {"text": text, "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True, "indice_name": "ada", "use_mclip": False,
            "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 3,
            "num_result_ids": 3, "verbose": False}
    r = client.post("/knn-service", json=body)
    assert r.status_code == 200, r.text
    assert set(r.headers["x-xmodal-ignored"].split(",")) == {"deduplicate", "use_safety_model",
                                                             "use_violence_detector", "aesthetic_score",
                                                             "aesthetic_weight"}
    rows = r.json()
    search = client.post("/search", json={"index": "ada", "query": text, "k": 3, "candidates": 3}).json()["hits"]
    assert [x["item_id"] for x in rows] == [h["id"] for h in search]
    assert [x["similarity"] for x in rows] == pytest.approx([h["score"] for h in search], abs=1e-6)
    assert all(isinstance(x["id"], int) and x["url"].startswith("http://testserver/media/ada/") for x in rows)
    assert client.get(rows[0]["url"]).status_code == 200
    meta = client.post("/metadata", json={"indice_name": "ada", "ids": [x["id"] for x in rows]}).json()
    assert [m["id"] for m in meta] == [x["id"] for x in rows]
    assert [m["metadata"]["item_id"] for m in meta] == [x["item_id"] for x in rows]
    assert meta[0]["metadata"]["caption"] == CAPTIONS[rows[0]["item_id"]][0]


def test_knn_service_text_modality_searches_captions(client):
    caption = CAPTIONS["forest"][0]
    rows = client.post("/knn-service", json={"text": caption, "modality": "text", "num_images": 2,
                                             "indice_name": "adb"}).json()
    assert rows[0]["item_id"] == "forest" and rows[0]["caption"] == caption
    assert rows[0]["similarity"] == pytest.approx(1.0, abs=1e-4)  # the caption's own embedding
    assert len(rows) == 2 and rows[1]["item_id"] != "forest"


def test_knn_service_image_and_embedding_queries(client, world):
    from xmodal.retrieval_index import GalleryIndex

    rows = client.post("/knn-service", json={"image": _b64_png(IMAGES["red-square"]), "modality": "image",
                                             "num_images": 1, "indice_name": "plain"}).json()
    assert rows[0]["item_id"] == "red-square"
    index = GalleryIndex.load(world["plain"])
    row = index.ids.index("traffic")
    vec = index.frame_features[row].float().mean(0)
    rows = client.post("/knn-service", json={"embedding_input": vec.tolist(), "num_images": 1,
                                             "indice_name": "plain"}).json()
    assert rows[0]["item_id"] == "traffic"


# ----------------------------------------------------------------------------- errors: 4xx with a message
@pytest.mark.parametrize("method,path,body,status,needle", [
    ("post", "/knn-service", {"text": "x", "indice_name": "nope"}, 404, "known indices: ['ada', 'adb', 'plain']"),
    ("post", "/search", {"index": "nope", "query": "x"}, 404, "unknown index 'nope'"),
    ("post", "/metadata", {"indice_name": "nope", "ids": [0]}, 404, "unknown index"),
    ("get", "/media/nope/sunrise", None, 404, "unknown index"),
    ("get", "/thumb/nope/sunrise", None, 404, "unknown index"),
    ("get", "/media/plain/missing", None, 404, "no item 'missing'"),
    ("post", "/metadata", {"indice_name": "plain", "ids": [0, 6]}, 404, "unknown: [6]"),
    ("post", "/search", {"index": "plain", "query": "   "}, 422, "empty query"),
    ("post", "/search", {"index": "plain"}, 422, "exactly one of 'query'"),
    ("post", "/search", {"index": "plain", "query": "x" * 1001}, 422, "at most 1000 characters"),
    ("post", "/search", {"index": "plain", "query": "x", "k": 0}, 422, "k:"),
    ("post", "/knn-service", {"text": "", "indice_name": "plain"}, 422, "empty query"),
    ("post", "/knn-service", {"indice_name": "plain"}, 422, "give one of 'text', 'image'"),
    ("post", "/knn-service", {"image_url": "http://example.com/a.jpg", "indice_name": "plain"}, 422, "image_url"),
    ("post", "/knn-service", {"image": "not base64!!", "indice_name": "plain"}, 422, "not valid base64"),
    ("post", "/knn-service", {"image": base64.b64encode(b"hello").decode(), "indice_name": "plain"}, 422,
     "not a decodable image"),
    ("post", "/knn-service", {"embedding_input": [1.0, 2.0], "indice_name": "plain"}, 422, "expected 32 numbers"),
    ("post", "/knn-service", {"embedding_input": [0.0] * 32, "indice_name": "plain"}, 422, "not all zero"),
    ("post", "/knn-service", {"text": "x", "use_mclip": True, "indice_name": "plain"}, 422, "use_mclip"),
    ("post", "/knn-service", {"text": "x", "modality": "audio", "indice_name": "plain"}, 422, "modality"),
    ("get", "/thumb/plain/sunrise?t=nan", None, 422, "t:"),
    ("get", "/thumb/plain/sunrise?t=-1", None, 422, "t:"),
])
def test_bad_requests_get_4xx_with_a_message(client, method, path, body, status, needle):
    r = getattr(client, method)(path, **({"json": body} if body is not None else {}))
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_knn_service_embedding_with_nan_is_refused(client):
    r = client.post("/knn-service", content=json.dumps({"embedding_input": [float("nan")] * 32,
                                                        "indice_name": "plain"}).encode(),
                    headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500


def test_text_modality_on_index_without_captions_is_a_clear_4xx(tmp_path, world):
    from e2e.serve_world import build_index
    from xmodal.serve import build_app

    media = {p.stem: str(p) for p in sorted(world["media"].iterdir())}
    build_index(tmp_path / "nocap", media, captions=False)
    with TestClient(build_app([str(tmp_path / "nocap")])) as c:
        r = c.post("/knn-service", json={"text": "x", "modality": "text", "indice_name": "nocap"})
        assert r.status_code == 422 and "no captions" in r.json()["detail"]
        assert c.post("/search", json={"index": "nocap", "query": "x", "k": 2}).status_code == 200


# ----------------------------------------------------------------------------- media, thumbnails
def test_media_full_and_range_requests(client, world):
    data = (world["media"] / "sunrise.webm").read_bytes()
    full = client.get("/media/plain/sunrise")
    assert full.status_code == 200 and full.content == data
    part = client.get("/media/plain/sunrise", headers={"Range": "bytes=10-29"})
    assert part.status_code == 206 and part.content == data[10:30]
    assert part.headers["content-range"] == f"bytes 10-29/{len(data)}"


@pytest.mark.parametrize("vid,t", [("sunrise", 0.0), ("sunrise", 2.5), ("traffic", 4.0), ("ocean", 99.0)])
def test_thumbnail_is_the_frame_at_t(client, vid, t):
    r = client.get(f"/thumb/plain/{vid}", params={"t": t})
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    frame = np.array(Image.open(io.BytesIO(r.content)).convert("RGB"))
    n, fps, colour = VIDEOS[vid]
    second = min(int(t), int((n - 1) / fps))  # past the end: the last frame
    assert palette_index(frame) == colour(second) % 64, (palette(colour(second)), frame.reshape(-1, 3).mean(0))
    at = float(r.headers["x-frame-time"])  # the frame really shown: the first at or after t, else the last
    assert at == pytest.approx(min(t, (n - 1) / fps), abs=1e-3)


def test_image_thumbnail(client):
    r = client.get("/thumb/plain/red-square")
    img = np.array(Image.open(io.BytesIO(r.content)).convert("RGB"))
    assert r.status_code == 200 and tuple(img[20, 20]) == pytest.approx(IMAGES["red-square"], abs=12)


# ----------------------------------------------------------------------------- metrics, page, openapi
def test_metrics_count_requests_per_endpoint(client):
    def count(text, endpoint, status):
        key = f'xmodal_requests_total{{method="POST",endpoint="{endpoint}",status="{status}"}} '
        line = [x for x in text.splitlines() if x.startswith(key)]
        return int(line[0].split()[-1]) if line else 0

    before = client.get("/metrics").text
    for _ in range(3):
        client.post("/search", json={"index": "plain", "query": "a blue square", "k": 1})
    client.post("/search", json={"index": "nope", "query": "x"})
    after = client.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    assert count(text, "/search", 200) - count(before, "/search", 200) == 3
    assert count(text, "/search", 404) - count(before, "/search", 404) == 1
    inf = [x for x in text.splitlines()
           if x.startswith('xmodal_request_duration_seconds_bucket{method="POST",endpoint="/search",le="+Inf"}')]
    total = [x for x in text.splitlines()
             if x.startswith('xmodal_request_duration_seconds_count{method="POST",endpoint="/search"}')]
    assert inf and total and inf[0].split()[-1] == total[0].split()[-1]


def test_page_and_openapi_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and "http" not in page.text.split("<body>")[0]
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "/search" in js.text and "best_time" in js.text
    schema = client.get("/openapi.json").json()
    assert {"/indices-list", "/knn-service", "/metadata", "/search", "/healthz", "/metrics"} <= set(schema["paths"])


# ----------------------------------------------------------------------------- CLI
def test_cli_serve_loads_indices_and_runs_uvicorn(world, monkeypatch, capsys):
    import uvicorn

    from xmodal.cli import main

    got = {}
    from xmodal.serve.server import NoDelayH11Protocol

    def fake_run(server, sockets=None):
        got.update(app=server.config.app, host=server.config.host, port=server.config.port, http=server.config.http)

    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    assert main(["serve", *specs(world), "--port", "8123"]) == 0
    assert (got["host"], got["port"], got["http"]) == ("127.0.0.1", 8123, NoDelayH11Protocol)
    out = capsys.readouterr().out
    assert "loaded 3 indices on 1 backbone(s)" in out and "http://127.0.0.1:8123/" in out
    with TestClient(got["app"]) as c:
        assert c.get("/indices-list").json() == ["plain", "ada", "adb"]
    assert main(["serve", str(world["plain"]), str(world["plain"])]) == 2
    assert "two indices are named 'plain'" in capsys.readouterr().err
    assert main(["serve", str(world["media"] / "nowhere")]) == 2


# ----------------------------------------------------------------------------- model registry
def _random_index(out, meta, dim=32, n=3):
    from xmodal.retrieval_index import GalleryIndex

    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, 2, dim, generator=g)
    return GalleryIndex(feats, torch.ones(n, 2, dtype=torch.bool), [f"i{k}" for k in range(n)],
                        [str(out.parent / f"i{k}.png") for k in range(n)], meta).save(out)


def test_indices_on_different_weights_get_their_own_backbone(tmp_path, world):
    from xmodal.serve import load_indices

    meta = {"backbone": "xmodal-test", "pretrained": "random", "seed": 1, "head": dict(HEAD), "max_words": 32}
    _random_index(tmp_path / "seed1", meta)
    loaded = load_indices([str(world["plain"]), str(world["ada"]), str(tmp_path / "seed1")])
    shared = [ix.encoder.shared for ix in loaded]
    assert shared[0] is shared[1] and shared[2] is not shared[0]
    q = "a red square"
    assert not torch.allclose(loaded[0].encoder.encode_text([q]), loaded[2].encoder.encode_text([q]))


def test_gallery_encoded_with_other_weights_is_refused(tmp_path):
    from xmodal.errors import XModalError
    from xmodal.serve import load_indices

    meta = {"backbone": "xmodal-tiny", "pretrained": "xmodal", "seed": 0, "head": dict(HEAD), "max_words": 32,
            "weights_sha256": "0" * 64}
    _random_index(tmp_path / "tiny", meta, dim=256)
    with pytest.raises(XModalError, match="encoded with weights sha256 000000000000"):
        load_indices([str(tmp_path / "tiny")])


def test_cors_is_off_by_default_and_opt_in(world):
    from xmodal.serve import build_app

    pre = {"Origin": "http://front.example", "Access-Control-Request-Method": "POST"}
    with TestClient(build_app([str(world["plain"])])) as c:
        assert "access-control-allow-origin" not in c.options("/knn-service", headers=pre).headers
    with TestClient(build_app([str(world["plain"])], cors_origins=["http://front.example"])) as c:
        r = c.options("/knn-service", headers=pre)
        assert r.headers["access-control-allow-origin"] == "http://front.example"
        other = c.options("/knn-service", headers={**pre, "Origin": "http://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "http://evil.example"


# ----------------------------------------------------------------------------- /search over IVF lists
def test_search_probes_ivf_lists_by_default_and_on_request(world, tmp_path):
    """An IVF frame index records a probe; /search then re-ranks every member of the probed lists
    (all lists: the exact ranking), and refuses probe with candidates or on a non-IVF index."""
    from xmodal.retrieval_index import GalleryIndex
    from xmodal.serve import build_app

    src = GalleryIndex.load(world["ada"])
    ivf = GalleryIndex(src.frame_features, src.frame_mask, src.ids, src.media, dict(src.meta), captions=src.captions,
                       faiss_factory="IVF2,Flat", candidate_vectors="frames", faiss_probe=2,
                       faiss_train_size=len(src.frame_vectors))
    ivf.save(tmp_path / "ivf")
    assert GalleryIndex.load(tmp_path / "ivf").default_probe == 2
    text = "cars drive through a busy street"
    _, _, scores = _brute_force(world, "ada", text)
    want = [src.ids[i] for i in torch.argsort(scores, descending=True).tolist()]
    with TestClient(build_app([f"ivf={tmp_path / 'ivf'}", f"flat={world['ada']}"])) as c:
        default = c.post("/search", json={"index": "ivf", "query": text, "k": 6}).json()
        assert [h["id"] for h in default["hits"]] == want
        assert default["candidates"] == len(want)  # both lists hold every item
        one = c.post("/search", json={"index": "ivf", "query": text, "k": 6, "probe": 1}).json()
        assert 1 <= one["candidates"] <= len(want) and len(one["hits"]) == min(6, one["candidates"])
        both = c.post("/search", json={"index": "ivf", "query": text, "probe": 1, "candidates": 3})
        assert both.status_code == 422 and "at most one of 'probe'" in both.json()["detail"]
        flat = c.post("/search", json={"index": "flat", "query": text, "probe": 1})
        assert flat.status_code == 422 and "needs an IVF index" in flat.json()["detail"]
        assert c.post("/search", json={"index": "ivf", "query": text, "probe": 3}).status_code == 422
