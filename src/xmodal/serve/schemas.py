"""Request and response bodies (they also make the OpenAPI schema at /openapi.json).

`KnnRequest` and `MetadataRequest` accept exactly what clip-retrieval's client and front end
send (`clip_retrieval/clip_client.py`, `clip_back.py`): unknown fields are ignored, the
safety/dedup/aesthetic switches are accepted and reported back as ignored.
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

MAX_QUERY_CHARS = 1000
MAX_IMAGE_BASE64 = 16 * 2**20  # characters (~12 MB of image)
MAX_RESULTS = 1000
MAX_CANDIDATES = 100_000
MAX_PROBE = 65_536
MAX_EMBEDDING = 8192
MAX_METADATA_IDS = 1000
NAME_CHARS = 200


class KnnRequest(BaseModel):
    """clip-retrieval's `/knn-service` request."""

    model_config = ConfigDict(extra="ignore")

    text: Optional[str] = Field(None, max_length=MAX_QUERY_CHARS, description="text query")
    image: Optional[str] = Field(None, max_length=MAX_IMAGE_BASE64, description="base64 image (JPEG/PNG/...)")
    image_url: Optional[str] = Field(None, max_length=4096, description="refused: the service makes no network calls")
    embedding_input: Optional[List[float]] = Field(None, max_length=MAX_EMBEDDING,
                                                   description="a query vector of the index's embedding size")
    modality: Literal["image", "text"] = Field("image", description="image: the visual gallery; text: its captions")
    num_images: int = Field(40, ge=1, le=MAX_RESULTS, description="results to return")
    num_result_ids: Optional[int] = Field(None, ge=1, le=MAX_CANDIDATES,
                                          description="FAISS top-K candidates re-ranked "
                                                      "(default: the index's default first stage)")
    indice_name: Optional[str] = Field(None, max_length=NAME_CHARS, description="index name (default: the first)")
    use_mclip: bool = False
    deduplicate: Optional[bool] = None
    use_safety_model: Optional[bool] = None
    use_violence_detector: Optional[bool] = None
    aesthetic_score: Optional[Union[int, str]] = None
    aesthetic_weight: Optional[Union[float, str]] = None


class MetadataRequest(BaseModel):
    """clip-retrieval's `/metadata` request: integer ids as returned by `/knn-service`."""

    model_config = ConfigDict(extra="ignore")

    indice_name: str = Field(..., max_length=NAME_CHARS)
    ids: List[int] = Field(..., max_length=MAX_METADATA_IDS)


class MetadataEntry(BaseModel):
    id: int
    metadata: Dict[str, Any]


class SearchRequest(BaseModel):
    """xmodal's own search: a text (or base64 image) query against one index."""

    model_config = ConfigDict(extra="forbid")

    index: str = Field(..., max_length=NAME_CHARS)
    query: Optional[str] = Field(None, max_length=MAX_QUERY_CHARS, description="text query")
    image: Optional[str] = Field(None, max_length=MAX_IMAGE_BASE64, description="base64 image query instead of text")
    k: int = Field(10, ge=1, le=MAX_RESULTS)
    candidates: Optional[int] = Field(None, ge=1, le=MAX_CANDIDATES,
                                      description="FAISS candidates re-ranked by the pooling head (default 1000)")
    exact: bool = Field(False, description="score every item with the pooling head (no FAISS shortlist)")
    probe: Optional[int] = Field(None, ge=1, le=MAX_PROBE,
                                 description="IVF indices: re-rank every item in `probe` lists (those "
                                             "holding the query's best frames, then those of its nearest "
                                             "centroids; default: the index's recorded probe, else `candidates`)")


class Moment(BaseModel):
    time: float
    weight: float


class SearchHit(BaseModel):
    rank: int
    id: str
    row: int
    score: float
    kind: str
    media_url: str
    thumb_url: str
    captions: List[str]
    moments: Optional[List[Moment]] = None
    best_time: Optional[float] = None


class SearchResponse(BaseModel):
    index: str
    query: Optional[str]
    pooling: str
    candidates: int
    exact: bool
    frame_times: str
    took_ms: float
    hits: List[SearchHit]
