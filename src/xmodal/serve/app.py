"""The FastAPI application: clip-retrieval's endpoints, xmodal's `/search`, media, page, metrics.

Every handler validates its input and answers 4xx with a one-line `detail` for anything a
client got wrong; the only paths to a 5xx are bugs (which the catch-all handler reports, so
the robustness tests can see them). Handlers are plain functions: FastAPI runs them in its
thread pool, and the per-backbone lock in `models.py` keeps adapters apart.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import quote

import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles

from xmodal.errors import XModalError
from xmodal.serve.catalog import ServedIndex, caption_search
from xmodal.serve.files import MediaAccessError, checked_media_path, thumbnail
from xmodal.serve.metrics import Metrics, MetricsMiddleware
from xmodal.serve.moments import frame_weights, moments
from xmodal.serve.schemas import (KnnRequest, MetadataEntry, MetadataRequest, SearchHit, SearchRequest,
                                  SearchResponse)

STATIC = Path(__file__).parent / "static"
DEFAULT_CANDIDATES = 1000
MAX_IMAGE_PIXELS = 40_000_000
#: clip-retrieval request switches that xmodal accepts and does not apply (reported in a header)
IGNORED_KNN_FIELDS = ("deduplicate", "use_safety_model", "use_violence_detector", "aesthetic_score",
                      "aesthetic_weight")
ERRORS = {404: {"description": "unknown index or item"}, 422: {"description": "invalid request"}}


def _fail(status: int, message: str):
    raise HTTPException(status_code=status, detail=message)


def _decode_image(data: str, field: str):
    from PIL import Image

    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        _fail(422, f"{field}: not valid base64")
    if not raw:
        _fail(422, f"{field}: empty image")
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                _fail(422, f"{field}: image of {img.width}x{img.height} pixels is larger than {MAX_IMAGE_PIXELS}")
            img.load()
            return img.convert("RGB")
    except HTTPException:
        raise
    except Exception as exc:  # PIL raises many types for foreign bytes (OSError, SyntaxError, ValueError...)
        _fail(422, f"{field}: not a decodable image ({type(exc).__name__})")


class Service:
    """The loaded indices and what the handlers share."""

    def __init__(self, indices: Sequence[ServedIndex]):
        self.indices: Dict[str, ServedIndex] = {ix.name: ix for ix in indices}
        self.metrics = Metrics()
        self._thumb = lru_cache(maxsize=1024)(thumbnail)

    def index(self, name: Optional[str]) -> ServedIndex:
        if name is None:
            return next(iter(self.indices.values()))
        ix = self.indices.get(name)
        if ix is None:
            _fail(404, f"unknown index {name!r}; known indices: {sorted(self.indices)}")
        return ix

    def item_row(self, ix: ServedIndex, item_id: str) -> int:
        row = ix.by_id.get(item_id)
        if row is None:
            _fail(404, f"index {ix.name!r} has no item {item_id!r}")
        return row

    # ------------------------------------------------------------ queries
    def text_vector(self, ix: ServedIndex, text: str, field: str) -> torch.Tensor:
        if not text.strip():
            _fail(422, f"{field}: empty query; type some words to search for")
        return ix.encoder.encode_text([text])[0]

    def image_vector(self, ix: ServedIndex, data: str, field: str) -> torch.Tensor:
        img = _decode_image(data, field)
        pixels = ix.encoder.preprocess(img).unsqueeze(0)
        return ix.encoder.encode_image(pixels)[0]

    def embedding_vector(self, ix: ServedIndex, values: List[float]) -> torch.Tensor:
        dim = ix.encoder.embed_dim
        if len(values) != dim:
            _fail(422, f"embedding_input: expected {dim} numbers (index {ix.name!r}), got {len(values)}")
        vec = torch.tensor(values, dtype=torch.float32)
        if not bool(torch.isfinite(vec).all()) or float(vec.norm()) == 0.0:
            _fail(422, "embedding_input: expected finite numbers, not all zero")
        return vec

    def rank(self, ix: ServedIndex, vector: torch.Tensor, k: int, candidates: Optional[int], exact: bool,
             probe: Optional[int] = None):
        """(hits, items re-ranked). The first stage: every item (`exact`), the members of `probe` IVF
        lists, the top `candidates` FAISS items, or else the index's recorded default."""
        if probe is not None and (candidates is not None or exact):
            _fail(422, "give at most one of 'probe' (IVF lists), 'candidates' (FAISS top-K) and 'exact'")
        try:
            return self._rank(ix, vector, k, candidates, exact, probe)
        except XModalError as exc:  # the index refuses the query (e.g. a non-finite vector): the client's input
            _fail(422, str(exc))

    def _rank(self, ix: ServedIndex, vector: torch.Tensor, k: int, candidates: Optional[int], exact: bool,
              probe: Optional[int]):
        n = len(ix.items)
        if exact:
            try:
                return ix.gallery.search(vector.reshape(1, -1), k=k, rerank=ix.head, exact=True)[0], n
            except TypeError:  # an index library without `exact`: every item as a candidate is the same
                pass
        probe = ix.gallery.probe_for(probe, candidates, exact)
        if probe is not None:
            stats: Dict[str, Any] = {}
            hits = ix.gallery.search(vector.reshape(1, -1), k=k, rerank=ix.head, probe=probe, stats=stats)[0]
            return hits, stats["candidates"][0]
        cand = n if exact else min(max(candidates or DEFAULT_CANDIDATES, k), n)
        hits = ix.gallery.search(vector.reshape(1, -1), k=k, rerank=ix.head, candidates=cand)[0]
        return hits, cand

    def urls(self, ix: ServedIndex, item_id: str):
        path = f"{quote(ix.name, safe='')}/{quote(item_id, safe='')}"
        return f"/media/{path}", f"/thumb/{path}"

    def moments_of(self, ix: ServedIndex, row: int, vector: torch.Tensor) -> Dict[str, Any]:
        item = ix.items[row]
        if item.kind != "video":
            return {}
        times = ix.frame_times(row)
        if times is None:
            return {}
        w = frame_weights(vector, ix.gallery.frame_features[row], ix.gallery.frame_mask[row], ix.head)
        return moments(w, times)


def create_app(indices: Sequence[ServedIndex], cors_origins: Sequence[str] = ()) -> FastAPI:
    """The service over already loaded indices (see `xmodal.serve.build_app` to load folders).

    `cors_origins`: web origins allowed to call the API from a browser (e.g. a clip-retrieval
    front end served elsewhere); none by default, so other sites cannot read a local service.
    """
    if not indices:
        raise ValueError("create_app needs at least one index")
    svc = Service(indices)
    app = FastAPI(title="xmodal serve", version="1",
                  description="Text/image search over xmodal indices; clip-retrieval compatible "
                              "(/indices-list, /knn-service, /metadata) plus /search with video moments.")
    app.state.service = svc
    app.add_middleware(MetricsMiddleware, metrics=svc.metrics)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "Range"])

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        parts = []
        for e in errors[:5]:
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
            parts.append(f"{loc}: {e.get('msg')}")
        clean = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors]
        return JSONResponse(status_code=422, content={"detail": "; ".join(parts) or "invalid request",
                                                      "errors": clean})

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # pragma: no cover - reached only through bugs
        return JSONResponse(status_code=500, content={"detail": f"internal error ({type(exc).__name__})"})

    # ---------------------------------------------------------------- clip-retrieval API
    @app.get("/indices-list", response_model=List[str], summary="names of the served indices")
    def indices_list():
        return list(svc.indices)

    @app.post("/knn-service", response_model=List[Dict[str, Any]], responses=ERRORS,
              summary="clip-retrieval's k-nearest-neighbour query")
    def knn_service(body: KnnRequest, request: Request, response: Response):
        ix = svc.index(body.indice_name)
        if body.image_url:
            _fail(422, "image_url: not supported (the service makes no network requests); "
                       "send the image itself base64-encoded in 'image'")
        if body.use_mclip:
            _fail(422, "use_mclip: multilingual CLIP is not available; the index's own text encoder is used")
        if body.text is not None and body.text.strip():
            vector = svc.text_vector(ix, body.text, "text")
        elif body.image:
            vector = svc.image_vector(ix, body.image, "image")
        elif body.embedding_input is not None:
            vector = svc.embedding_vector(ix, body.embedding_input)
        elif body.text is not None:
            vector = svc.text_vector(ix, body.text, "text")  # refuses the empty text
        else:
            _fail(422, "give one of 'text', 'image' (base64) or 'embedding_input'")
        ignored = [f for f in IGNORED_KNN_FIELDS if getattr(body, f) not in (None, False, "")]
        if ignored:
            response.headers["X-XModal-Ignored"] = ",".join(ignored)
        k = min(body.num_images, len(ix.items))
        base = str(request.base_url).rstrip("/")  # absolute URLs: clip-retrieval fronts live elsewhere
        out = []
        if body.modality == "text":
            if not ix.has_captions:
                _fail(422, f"modality 'text': index {ix.name!r} has no captions to search; "
                           f"use modality 'image' (its visual gallery)")
            for row, sim, caption in caption_search(ix, vector, k):
                out.append(_knn_row(svc, ix, row, sim, caption, base))
            return out
        hits, _ = svc.rank(ix, vector, k, body.num_result_ids, exact=False)  # None: the index's default stage
        for h in hits:
            row = _row(ix, h)
            out.append(_knn_row(svc, ix, row, h.score, None, base))
        return out

    @app.post("/metadata", response_model=List[MetadataEntry], responses=ERRORS,
              summary="clip-retrieval's metadata of result ids")
    def metadata(body: MetadataRequest, request: Request):
        ix = svc.index(body.indice_name)
        bad = [i for i in body.ids if not 0 <= i < len(ix.items)]
        if bad:
            _fail(404, f"index {ix.name!r} has ids 0..{len(ix.items) - 1}; unknown: {bad[:10]}")
        base = str(request.base_url).rstrip("/")
        return [{"id": i, "metadata": _item_metadata(svc, ix, i, None, base)} for i in body.ids]

    # ---------------------------------------------------------------- xmodal API
    @app.post("/search", response_model=SearchResponse, responses=ERRORS,
              summary="text or image search with video moments (where in each video the query happens)")
    def search(body: SearchRequest):
        t0 = time.perf_counter()
        ix = svc.index(body.index)
        if (body.query is None) == (body.image is None):
            _fail(422, "give exactly one of 'query' (text) or 'image' (base64)")
        if body.query is not None:
            vector = svc.text_vector(ix, body.query, "query")
        else:
            vector = svc.image_vector(ix, body.image, "image")
        hits, cand = svc.rank(ix, vector, body.k, body.candidates, body.exact, body.probe)
        rows = []
        for h in hits:
            row = _row(ix, h)
            item = ix.items[row]
            media_url, thumb_url = svc.urls(ix, item.id)
            rows.append(SearchHit(rank=h.rank, id=item.id, row=row, score=h.score, kind=item.kind,
                                  media_url=media_url, thumb_url=thumb_url, captions=item.captions,
                                  **svc.moments_of(ix, row, vector)))
        times = (f"sampling rule at the index's recorded fps={ix.fps:g}" if ix.fps_recorded
                 else f"sampling rule at fps={ix.fps:g} (the default; the index does not record its fps)")
        if "segments" not in ix.gallery.meta:
            times += "; items taken as whole files (the index records no segments)"
        return SearchResponse(index=ix.name, query=body.query, pooling=ix.head.pooling, candidates=cand,
                              exact=body.exact, frame_times=times,
                              took_ms=round((time.perf_counter() - t0) * 1000, 3), hits=rows)

    @app.get("/media/{index}/{item_id:path}", responses={**ERRORS, 403: {"description": "outside the media root"}},
             summary="the item's file (HTTP range requests supported)")
    def media(index: str, item_id: str):
        ix = svc.index(index)
        item = ix.items[svc.item_row(ix, item_id)]
        try:
            path = checked_media_path(item.media, ix.media_root, item.id)
        except MediaAccessError as exc:
            _fail(exc.status, str(exc))
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    @app.get("/thumb/{index}/{item_id:path}", responses={**ERRORS, 403: {"description": "outside the media root"}},
             summary="JPEG keyframe at t seconds", response_class=Response)
    def thumb(index: str, item_id: str,
              t: float = Query(0.0, ge=0.0, le=1e6, allow_inf_nan=False, description="seconds into the video")):
        ix = svc.index(index)
        item = ix.items[svc.item_row(ix, item_id)]
        try:
            path = checked_media_path(item.media, ix.media_root, item.id)
            data, at = svc._thumb(path, item.kind, round(float(t), 3))
        except MediaAccessError as exc:
            _fail(exc.status, str(exc))
        return Response(data, media_type="image/jpeg",
                        headers={"X-Frame-Time": f"{at:.3f}", "Cache-Control": "max-age=3600"})

    # ---------------------------------------------------------------- operations
    @app.get("/healthz", summary="liveness and the loaded indices")
    def healthz():
        return {"status": "ok", "indices": [ix.describe() for ix in svc.indices.values()],
                "backbones": len({id(ix.encoder.shared) for ix in svc.indices.values()})}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def metrics():
        return PlainTextResponse(svc.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------- web page
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _row(ix: ServedIndex, hit) -> int:
    row = getattr(hit, "row", -1)
    return row if row is not None and row >= 0 else ix.by_id[str(hit.id)]


def _item_metadata(svc: Service, ix: ServedIndex, row: int, caption: Optional[str], base: str) -> Dict[str, Any]:
    item = ix.items[row]
    media_url, thumb_url = (base + u for u in svc.urls(ix, item.id))
    return {"caption": caption if caption is not None else (item.captions[0] if item.captions else None),
            "url": media_url, "thumbnail_url": thumb_url, "item_id": item.id, "kind": item.kind}


def _knn_row(svc: Service, ix: ServedIndex, row: int, similarity: float, caption: Optional[str],
             base: str) -> Dict[str, Any]:
    out = _item_metadata(svc, ix, row, caption, base)
    out["id"] = row
    out["similarity"] = float(similarity) if math.isfinite(similarity) else None
    return out
