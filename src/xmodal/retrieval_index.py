"""An indexed gallery: encode visual items once, answer text queries later.

The gallery is encoded offline, independently of any query (the dual-encoder property the
Cross-Modal Adapter keeps: O(N) encodings, not O(N*Q)). Per-frame features are stored so a
text-conditioned pooling head can re-rank; a FAISS inner-product index over the L2-normalised
mean-pooled features finds the candidates (two-stage search), or every item is scored
(`exact=True`).

An index is one folder, written as a whole and swapped in with renames
(`xmodal.atomic.atomic_directory`): a reader sees the previous index or the new one, never new
features with old ids. It holds

* `frame_features.safetensors` — `frame_features` (N, F, D) float16 and `frame_mask` (N, F) uint8,
  read back memory-mapped for large galleries (no pickle anywhere);
* `mean_pooled.faiss` — the candidate index (any FAISS factory string, `Flat` by default);
* `gallery.json` — ids, media paths and captions of the items, the model/head recipe, the FAISS
  settings, whether the gallery is partial (items dropped for unreadable media) and the sizes of
  the two binary files, so a truncated or swapped file is refused with its name.

Media and adapter paths are stored relative to the index folder where the two share a parent
folder, so a run folder moved as a whole keeps working.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import faiss
import numpy as np
import torch

from xmodal.atomic import WriteError, atomic_directory
from xmodal.engine.heads import mean_pool
from xmodal.errors import XModalError

FEATURES = "frame_features.safetensors"
META = "gallery.json"
FAISS_FILE = "mean_pooled.faiss"  # historical name: holds mean-pooled or frame vectors (gallery.json says)
#: what FAISS indexes: one mean-pooled vector per item, or every real frame (best frame = item score)
CANDIDATE_VECTORS = ("mean", "frames")
FORMAT_VERSION = 2
#: galleries below this size get an exact `Flat` candidate index unless told otherwise
FLAT_LIMIT = 100_000
#: factories used at FLAT_LIMIT items and above, per candidate vectors (benchmarks/search_speed.py)
LARGE_FACTORY = {"mean": "HNSW32", "frames": "IVF1024,PQ64"}
#: frame indices of galleries this large get 4096 lists (~3000 frames a list at 1M videos x 12 frames)
HUGE_ITEMS, HUGE_FRAME_FACTORY = 500_000, "IVF4096,PQ64"
#: IVF lists probed per query unless --faiss-params says otherwise (FAISS's own default, 1, misses most)
DEFAULT_NPROBE = 32
#: FAISS's own search (top-K candidates) probes 1/NPROBE_SHARE of an IVF index's lists: 32 of 1024, 128 of 4096
NPROBE_SHARE = 32
#: IVF frame indices read 1/PROBE_SHARE of their lists whole by default (`search(probe=...)`): 42 of 1024,
#: 170 of 4096, where benchmarks/search_speed.py measured recall@10 >= 0.99 on its 100k and 1M galleries
PROBE_SHARE = 24
#: features files above this size are memory-mapped on load (mmap=None)
MMAP_ABOVE_BYTES = 256 * 2**20
_ROWS_PER_CHUNK = 16384
#: items re-ranked per block (a few MB of float32 frames: fits the cache, see `GalleryIndex._gather`)
_RERANK_ROWS = 2048

Rerank = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class IndexFileError(XModalError):
    """An index file is missing, truncated, not what its name says, or does not match the others."""


@dataclass
class Hit:
    rank: int
    id: str
    media: str
    score: float
    row: int = -1  # the item's row in the index (per-frame features, captions)


# ------------------------------------------------------------------ metadata
def index_meta(cfg, adapter: Optional[Union[str, os.PathLike]] = None) -> Dict[str, Any]:
    """What `xmodal search` needs to rebuild the query side: model, adapter, pooling head, word budget.

    The adapter path is absolute here; `GalleryIndex.save` stores it relative to the index when it can.
    """
    return {
        "backbone": cfg.model.backbone, "pretrained": cfg.model.pretrained, "seed": cfg.train.seed,
        "adapter": str(Path(adapter).resolve()) if adapter else None,
        "head": {"pooling": cfg.head.pooling, "temperature": cfg.head.temperature, "normalize": cfg.head.normalize},
        "max_words": cfg.data.max_words, "dataset": cfg.data.dataset, "split": cfg.data.eval_split,
        "num_frames": cfg.data.num_frames, "fps": cfg.data.fps,
    }


def portable_path(target: Union[str, os.PathLike], base: Union[str, os.PathLike]) -> str:
    """`target` relative to folder `base` when they share a parent folder below `/`, else absolute.

    A run folder that holds both the index and the media (or adapter) can then be moved whole.
    """
    target = os.path.abspath(os.fspath(target))
    base = os.path.abspath(os.fspath(base))
    try:
        common = os.path.commonpath([target, base])
    except ValueError:  # different drives
        return target
    if common == os.path.dirname(common) or os.path.dirname(common) == os.path.dirname(os.path.dirname(common)):
        return target  # only `/` or a top-level folder like /home in common: keep absolute
    return os.path.relpath(target, base)


def resolve_path(stored: Optional[str], index_dir: Union[str, os.PathLike],
                 built_at: Optional[str] = None) -> Optional[str]:
    """An absolute path for a path stored by `portable_path` (relative to the index folder).

    A relative path is looked up beside the index first (the folder moved as a whole), then
    beside the folder the index was built in (only the index moved).
    """
    if not stored:
        return stored
    if os.path.isabs(stored):
        return stored
    here = os.path.normpath(os.path.join(os.path.abspath(os.fspath(index_dir)), stored))
    if built_at and not os.path.exists(here):
        there = os.path.normpath(os.path.join(built_at, stored))
        if os.path.exists(there):
            return there
    return here


def check_queries(queries: Sequence[str]) -> List[str]:
    """Refuse an empty query list or a blank query (it would still get ranked hits)."""
    queries = list(queries)
    if not queries:
        raise XModalError("no query given: expected at least one non-empty text query")
    for i, q in enumerate(queries):
        if not isinstance(q, str) or not q.strip():
            raise XModalError(f"query {i + 1} is empty: expected a text with at least one non-space character")
    return queries


# ---------------------------------------------------------------- validation
def _first_bad_row(features: torch.Tensor, mask: torch.Tensor) -> Tuple[Optional[int], str]:
    """First item row with a non-finite value, or whose real frames are all exactly zero."""
    for start in range(0, features.shape[0], _ROWS_PER_CHUNK):
        block = features[start:start + _ROWS_PER_CHUNK]
        finite = torch.isfinite(block).flatten(1).all(dim=1)
        if not bool(finite.all()):
            return start + int((~finite).nonzero()[0]), "is not finite (NaN or inf)"
        m = mask[start:start + _ROWS_PER_CHUNK]
        m = m | ~m.any(dim=1, keepdim=True)
        nonzero = ((block != 0).any(dim=-1) & m).any(dim=1)
        if not bool(nonzero.all()):
            return start + int((~nonzero).nonzero()[0]), "is all zeros (an unreadable item encoded as zeros?)"
    return None, ""


def _pooled(features: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """L2-normalised mean-pooled vectors (N, D) float32, in chunks (features may be 1M x 12 x D fp16)."""
    out = np.empty((features.shape[0], features.shape[2]), dtype=np.float32)
    for start in range(0, features.shape[0], _ROWS_PER_CHUNK):
        stop = start + _ROWS_PER_CHUNK
        out[start:stop] = mean_pool(features[start:stop].float(), mask[start:stop]).numpy()
    return out


class FrameVectors:
    """The L2-normalised real frames of a gallery as one (M, D) float32 matrix, computed on demand
    (1M videos x 12 frames would be 12 GB in float32); `owner[i]` is the item row of vector i."""

    def __init__(self, features: torch.Tensor, mask: torch.Tensor):
        self.features = features.reshape(-1, features.shape[2])
        self.flat = np.flatnonzero((mask | ~mask.any(dim=1, keepdim=True)).reshape(-1).numpy())
        self.owner = self.flat // features.shape[1]
        self.shape = (len(self.flat), features.shape[2])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, sel) -> np.ndarray:
        rows = torch.as_tensor(self.flat[sel], dtype=torch.long)
        return torch.nn.functional.normalize(self.features[rows].float(), dim=-1).numpy()


def frame_gram(frames: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """(V, F, F) float32 Gram matrices of each item's frames (query-independent part of the score)."""
    f = frames.float()
    if normalize:
        f = torch.nn.functional.normalize(f, dim=-1)
    return torch.bmm(f, f.transpose(1, 2))


def text_conditioned_scores(text: torch.Tensor, frames: torch.Tensor, mask: Optional[torch.Tensor],
                            temperature: float = 5.0, normalize: bool = False,
                            gram: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exactly `heads.text_conditioned_similarity`, (Q, V), without its (V, Q, D) pooled tensor.

    With s_j = <t, f_j> and alpha = softmax(s / tau) over the real frames,
    cos(t, sum_j alpha_j f_j) = sum_j alpha_j s_j / (|t| sqrt(alpha^T G alpha)), G = the video's frame
    Gram matrix (F x F, independent of the query): one (Q, D) x (D, V*F) matmul does the work.
    """
    from xmodal.engine.heads import _valid_mask

    t = text.float()
    f = frames.float()
    if normalize:
        t = torch.nn.functional.normalize(t, dim=-1)
        f = torch.nn.functional.normalize(f, dim=-1)
    v, n_f, d = f.shape
    valid = _valid_mask(mask, f)
    s = (t @ f.reshape(v * n_f, d).t()).reshape(t.shape[0], v, n_f)
    alpha = (s / temperature).masked_fill(~valid.unsqueeze(0), float("-inf")).softmax(dim=-1)
    num = (alpha * s).sum(dim=-1)
    gram = torch.bmm(f, f.transpose(1, 2)) if gram is None else gram  # (V, F, F)
    ag = torch.bmm(alpha.permute(1, 0, 2), gram).permute(1, 0, 2)  # (Q, V, F)
    den = (ag * alpha).sum(dim=-1).clamp_min(0).sqrt().clamp_min(1e-12)
    return num / den / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------- FAISS
def default_factory(n_items: int, vectors: str = "mean") -> str:
    if n_items < FLAT_LIMIT:
        return "Flat"
    return HUGE_FRAME_FACTORY if vectors == "frames" and n_items >= HUGE_ITEMS else LARGE_FACTORY[vectors]


def default_probe(nlist: int) -> int:
    """Lists read whole per query by default on an IVF index of `nlist` lists."""
    return max(1, nlist // PROBE_SHARE)


def training_points_needed(factory: str) -> int:
    """Fewest training vectors FAISS accepts for `factory` (0: no training): one per IVF list,
    2**nbits per product-quantiser codebook."""
    need = 0
    for m in re.finditer(r"IVF(\d+)", factory):
        need = max(need, int(m.group(1)))
    for m in re.finditer(r"(?<![A-Z])(?:O?PQ)(\d+)(?:x(\d+))?", factory):
        need = max(need, 2 ** int(m.group(2) or 8))
    return need


def check_factory(factory: str, dim: int, n_vectors: int) -> faiss.Index:
    """The empty FAISS index of a factory string, refusing a malformed one or one that needs more
    training points than there are vectors (called before encoding, and again when building)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].split(": ", 1)[-1][:200]
        raise XModalError(f"--faiss {factory!r}: not a FAISS index factory string for dimension {dim} ({reason}); "
                          f"e.g. Flat, HNSW32, IVF1024,Flat, IVF4096,PQ32") from None
    need = max(1, training_points_needed(factory)) if not index.is_trained else 0
    if n_vectors < need:
        raise XModalError(
            f"--faiss {factory!r} needs at least {need} training points (one per IVF list / PQ codeword) "
            f"but the gallery has {n_vectors} items; use Flat or HNSW32, or a smaller IVF/PQ")
    return index


def build_faiss(vectors, factory: Optional[str] = None, train_size: Optional[int] = None,
                seed: int = 0, search_params: Optional[str] = None, default_for: Optional[int] = None,
                vectors_kind: str = "mean") -> Tuple[faiss.Index, Dict[str, Any]]:
    """An inner-product FAISS index over `vectors` (N, D) built from a factory string.

    `vectors` is an array or anything with `.shape` and slice/index-array `__getitem__` returning
    float32 rows (`FrameVectors`); it is read in blocks.

    Indices that need training (IVF, PQ) are trained on a seeded sample of `train_size` vectors
    (default: 40 per centroid/codeword, at least 10 000, at most N). A factory that needs more
    training points than there are items is refused.
    """
    n, d = vectors.shape
    factory = factory or default_factory(default_for or n, vectors_kind)
    index = check_factory(factory, d, n)
    info: Dict[str, Any] = {"factory": factory, "trained_on": 0}
    if not index.is_trained:
        need = max(1, training_points_needed(factory))
        size = min(n, int(train_size) if train_size else max(40 * need, 10_000))
        if size < need:
            raise XModalError(f"--faiss-train-size {size}: {factory!r} needs at least {need} training points")
        rows = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False)) if size < n else slice(0, n)
        try:
            index.train(np.ascontiguousarray(vectors[rows]))
        except RuntimeError as exc:
            raise XModalError(f"--faiss {factory!r}: training on {size} points failed: "
                              f"{str(exc).strip().splitlines()[-1][:200]}") from None
        info["trained_on"] = int(size)
    for start in range(0, n, 262144):
        index.add(np.ascontiguousarray(vectors[start:start + 262144]))
    if not search_params and faiss.try_extract_index_ivf(index) is not None:
        search_params = f"nprobe={max(DEFAULT_NPROBE, faiss.extract_index_ivf(index).nlist // NPROBE_SHARE)}"
    if search_params:
        set_search_params(index, search_params)
        info["search_params"] = search_params
    return index, info


def set_search_params(index: faiss.Index, params: str) -> None:
    """`nprobe=32`, `efSearch=128`, ... (faiss.ParameterSpace syntax)."""
    try:
        faiss.ParameterSpace().set_index_parameters(index, params)
    except RuntimeError as exc:
        raise XModalError(f"--faiss-params {params!r}: {str(exc).strip().splitlines()[-1][:200]}") from None


# -------------------------------------------------------- safetensors (mmap)
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None,
                      dtypes: Optional[Dict[str, torch.dtype]] = None) -> None:
    """Stream tensors into a safetensors file block by block, cast to `dtypes[name]` on the way
    (a 1M-video gallery needs no second full copy in memory)."""
    dtypes = dict(dtypes or {})
    header: Dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, t in tensors.items():
        dtype = dtypes.setdefault(name, t.dtype)
        size = int(t.numel()) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, t in tensors.items():
            rows = t.reshape(1, -1) if t.dim() == 0 else t
            for start in range(0, rows.shape[0], _ROWS_PER_CHUNK):
                f.write(rows[start:start + _ROWS_PER_CHUNK].to(dtypes[name]).contiguous().numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def read_safetensors(path: Path, mmap: bool) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Arrays of a safetensors file, memory-mapped (copy-on-write) or read; every header field checked."""
    size = path.stat().st_size

    def bad(why: str) -> IndexFileError:
        return IndexFileError(f"{path}: {why}; rebuild the index with `xmodal index`")

    if size < 8:
        raise bad(f"truncated ({size} bytes) or not a safetensors file")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > min(size - 8, 100 * 2**20):
            raise bad("not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise bad("not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start, end = 8 + n, 0
    arrays: Dict[str, np.ndarray] = {}
    for name, entry in header.items():
        try:
            dtype = np.dtype(_ST_DTYPES[entry["dtype"]])
            shape = tuple(int(s) for s in entry["shape"])
            begin, stop = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has an unsupported dtype or a malformed entry") from None
        if stop - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or begin < 0:
            raise bad(f"tensor {name!r}: shape {shape} does not match its byte range")
        if data_start + stop > size:
            raise bad(f"truncated: tensor {name!r} needs {data_start + stop} bytes, the file has {size}")
        end = max(end, stop)
        if mmap and stop > begin:
            arrays[name] = np.memmap(path, dtype=dtype, mode="c", offset=data_start + begin, shape=shape)
        else:
            with open(path, "rb") as f:
                f.seek(data_start + begin)
                arrays[name] = np.frombuffer(bytearray(f.read(stop - begin)), dtype=dtype).reshape(shape)
    if data_start + end != size:
        raise bad(f"{size - data_start - end} unexpected trailing bytes (not the file gallery.json describes)")
    return arrays, {str(k): str(v) for k, v in metadata.items()}


# --------------------------------------------------------------------- index
class _Block:
    """Buffers one re-rank block is copied into (frames as 8-byte words and as float32, Gram
    matrices), allocated once per `score_rows` call instead of a fresh 25 MB tensor (and its page
    faults) per block."""

    def __init__(self, features: torch.Tensor, gram: Optional[torch.Tensor], rows: int):
        n, f, d = features.shape
        rows = max(1, rows)
        words = f * d * features.element_size()
        self.words = torch.empty(rows, max(1, words // 8), dtype=torch.int64)
        self.frames = torch.empty(rows, f, d, dtype=torch.float32)
        self._gram_table = gram
        self._grams = None if gram is None else torch.empty(rows, *gram.shape[1:], dtype=gram.dtype)

    def grams(self, rows: torch.Tensor) -> Optional[torch.Tensor]:
        """The cached Gram matrices of `rows` (None when there is no cache)."""
        if self._gram_table is None:
            return None
        return torch.index_select(self._gram_table, 0, rows, out=self._grams[:len(rows)])


class GalleryIndex:
    """Per-frame features (N, F, D) + frame mask + item ids/media/captions, with a FAISS index on top.

    `frame_features` keeps the dtype it is given (a loaded index: float16, possibly memory-mapped);
    pooling heads compute in float32.
    """

    def __init__(self, frame_features: torch.Tensor, frame_mask: torch.Tensor, ids: Sequence[str],
                 media: Sequence[str], meta: Optional[Dict] = None, *, captions: Optional[Sequence[Sequence[str]]] = None,
                 faiss_factory: Optional[str] = None, faiss_train_size: Optional[int] = None,
                 faiss_params: Optional[str] = None, faiss_index: Optional[faiss.Index] = None,
                 candidate_vectors: Optional[str] = None, frame_oversample: Optional[int] = None,
                 faiss_probe: Optional[int] = None, check: bool = True, seed: int = 0):
        if frame_features.dim() != 3 or frame_mask.shape != frame_features.shape[:2]:
            raise XModalError(
                f"gallery features must be (N, F, D) with a (N, F) mask, got {tuple(frame_features.shape)} "
                f"and {tuple(frame_mask.shape)}"
            )
        if len(ids) != frame_features.shape[0] or len(media) != len(ids):
            raise XModalError(f"gallery has {frame_features.shape[0]} feature rows but {len(ids)} ids / {len(media)} paths")
        if captions is not None and len(captions) != len(ids):
            raise XModalError(f"gallery has {len(ids)} items but {len(captions)} caption lists")
        if len(ids) == 0:
            raise XModalError("gallery is empty: expected at least one item with readable media")
        if frame_features.dtype not in (torch.float16, torch.float32):
            frame_features = frame_features.float()
        self.frame_features = frame_features
        self.frame_mask = frame_mask.bool()
        self.ids = [str(i) for i in ids]
        self.media = [str(m) for m in media]
        self.captions = [list(c) for c in captions] if captions is not None else None
        self.meta = dict(meta or {})
        if check:
            row, why = _first_bad_row(self.frame_features, self.frame_mask)
            if row is not None:
                raise XModalError(f"gallery features of item {row} ({self.ids[row]!r}) {why}; "
                                  f"an index is never built from such features: re-encode the item or drop it")
        self._pooled_cache: Optional[np.ndarray] = None
        self._gram_cache: Optional[Tuple[bool, torch.Tensor]] = None
        self._list_members = None
        self._frame_vectors: Optional[FrameVectors] = None
        stored = (self.meta.get("faiss") or {}) if faiss_index is not None else {}
        self.candidate_vectors = candidate_vectors or stored.get("vectors") or (
            "mean" if faiss_index is not None else self._default_vectors())
        if self.candidate_vectors not in CANDIDATE_VECTORS:
            raise XModalError(f"candidate vectors {self.candidate_vectors!r}: expected one of {list(CANDIDATE_VECTORS)}")
        self.frame_oversample = int(frame_oversample or stored.get("frame_oversample") or self.frame_features.shape[1])
        if faiss_index is None:
            source = self.pooled if self.candidate_vectors == "mean" else self.frame_vectors
            faiss_index, info = build_faiss(source, faiss_factory, faiss_train_size, seed, faiss_params,
                                            default_for=len(self), vectors_kind=self.candidate_vectors)
            info.update(vectors=self.candidate_vectors, frame_oversample=self.frame_oversample)
            self.meta["faiss"] = info
            if faiss_probe is None and self.candidate_vectors == "frames" and \
                    faiss.try_extract_index_ivf(faiss_index) is not None:
                faiss_probe = default_probe(faiss.extract_index_ivf(faiss_index).nlist)
        else:
            want = len(self) if self.candidate_vectors == "mean" else len(self.frame_vectors)
            if faiss_index.ntotal != want or faiss_index.d != self.dim:
                raise XModalError(f"FAISS index holds {faiss_index.ntotal} vectors of dim {faiss_index.d}, the "
                                  f"gallery has {want} {self.candidate_vectors} vectors of dim {self.dim}")
        self.faiss = faiss_index
        if faiss_probe is not None:
            from xmodal.ivf_lists import check_probe

            self.meta.setdefault("faiss", {})["probe"] = check_probe(faiss_index, faiss_probe)

    @property
    def default_probe(self) -> Optional[int]:
        """IVF lists whose every member the search re-ranks unless told otherwise (`xmodal index
        --probe`; recorded in gallery.json), or None: FAISS top-K candidates."""
        probe = (self.meta.get("faiss") or {}).get("probe")
        return int(probe) if probe else None

    def probe_for(self, probe: Optional[int] = None, candidates: Optional[int] = None,
                  exact: bool = False) -> Optional[int]:
        """The `probe` a search asked for this way reads with: the one given; none when a top-K
        (`candidates`) or an exact search is asked for; else the index's recorded default."""
        if probe is not None or candidates is not None or exact:
            return probe
        return self.default_probe

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.frame_features.shape[2])

    def _default_vectors(self) -> str:
        """Frames for a text-conditioned head on videos (it weights the best-matching frames, which the
        mean of all frames predicts poorly: see benchmarks/search_speed.py), the mean otherwise."""
        pooling = (self.meta.get("head") or {}).get("pooling")
        return "frames" if pooling == "text_conditioned" and self.frame_features.shape[1] > 1 else "mean"

    @property
    def frame_vectors(self) -> FrameVectors:
        if self._frame_vectors is None:
            self._frame_vectors = FrameVectors(self.frame_features, self.frame_mask)
        return self._frame_vectors

    @property
    def pooled(self) -> np.ndarray:
        """L2-normalised mean-pooled item vectors (N, D) float32 (what FAISS indexes)."""
        if self._pooled_cache is None:
            self._pooled_cache = _pooled(self.frame_features, self.frame_mask)
        return self._pooled_cache

    @property
    def partial(self) -> bool:
        """True when items of the split were left out for unreadable media (`meta['dropped']` lists them)."""
        return bool(self.meta.get("partial"))

    def item(self, row: int) -> Dict[str, Any]:
        """Metadata of one item: id, media (absolute path), captions."""
        return {"id": self.ids[row], "media": self.media[row],
                "captions": list(self.captions[row]) if self.captions is not None else []}

    def frames(self, rows: Union[Sequence[int], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-frame features (len(rows), F, D) float32 and mask (len(rows), F) of some items."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return self.frame_features[rows].float(), self.frame_mask[rows]

    # ------------------------------------------------------------- search
    def _query(self, text_features: torch.Tensor) -> torch.Tensor:
        text = torch.as_tensor(text_features)
        if text.dim() == 1:
            text = text.unsqueeze(0)
        if text.dim() != 2 or text.shape[1] != self.dim:
            raise XModalError(f"query features must be (Q, {self.dim}), got {tuple(text.shape)}")
        if text.shape[0] == 0:
            raise XModalError("no query given: expected at least one query")
        text = text.float()
        if not bool(torch.isfinite(text).all()):
            raise XModalError("query features are not finite (NaN or inf); refusing to rank with them")
        if not bool((text.norm(dim=-1) > 0).all()):
            raise XModalError("a query feature vector is all zeros; refusing to rank with it")
        return text

    def candidates(self, text_features: torch.Tensor, n: int) -> Tuple[np.ndarray, np.ndarray]:
        """FAISS stage: (scores, rows), each (Q, n), best first; rows of -1 pad a short result (IVF).

        With frame vectors, an item's score is its best frame's cosine; `frame_oversample * n` frames
        are fetched so that n distinct items are found (every item has at most F frames).
        """
        text = torch.nn.functional.normalize(self._query(text_features), dim=-1)
        x = np.ascontiguousarray(text.numpy(), dtype=np.float32)
        n = max(1, min(int(n), len(self)))
        if self.candidate_vectors == "mean":
            return self.faiss.search(x, n)
        owner = self.frame_vectors.owner
        scores, idx = self.faiss.search(x, max(1, min(len(owner), n * self.frame_oversample)))
        out_s = np.full((len(x), n), -np.inf, dtype=np.float32)
        out_i = np.full((len(x), n), -1, dtype=np.int64)
        for q in range(len(x)):
            ok = idx[q] >= 0
            items = owner[idx[q][ok]]
            _, first = np.unique(items, return_index=True)
            first = np.sort(first)[:n]
            out_i[q, :len(first)] = items[first]
            out_s[q, :len(first)] = scores[q][ok][first]
        return out_s, out_i

    def score_all(self, text_features: torch.Tensor, rerank: Optional[Rerank] = None,
                  chunk: int = _ROWS_PER_CHUNK) -> torch.Tensor:
        """Exact scores (Q, N) of every item: `rerank` head on all frames, in item chunks (or cosine
        with the mean-pooled vectors when no head is given)."""
        text = self._query(text_features)
        if rerank is None:
            unit = torch.nn.functional.normalize(text, dim=-1)
            return unit @ torch.from_numpy(self.pooled).t()
        out = torch.empty(text.shape[0], len(self))
        with torch.no_grad():
            for start in range(0, len(self), chunk):
                stop = min(len(self), start + chunk)
                out[:, start:stop] = self._rerank(rerank, text, self.frame_features[start:stop],
                                                  self.frame_mask[start:stop], self._grams(rerank, start, stop))
        return out

    def _grams(self, rerank: Rerank, start: int, stop: int) -> Optional[torch.Tensor]:
        table = self._gram_table(rerank)
        return None if table is None else table[start:stop]

    def _gram_table(self, rerank: Optional[Rerank], compute: bool = True) -> Optional[torch.Tensor]:
        """Frame Gram matrices of every item for exact text-conditioned scoring (N x F x F float32,
        computed once, e.g. 576 MB at 1M videos x 12 frames); None for other heads, or when not yet
        computed and `compute` is False."""
        if getattr(rerank, "pooling", None) != "text_conditioned" or not hasattr(rerank, "normalize"):
            return None
        key = bool(rerank.normalize)
        if self._gram_cache is None or self._gram_cache[0] != key:
            if not compute:
                return None
            n, f = self.frame_mask.shape
            gram = torch.empty(n, f, f)
            with torch.no_grad():
                for a in range(0, n, _ROWS_PER_CHUNK):
                    gram[a:a + _ROWS_PER_CHUNK] = frame_gram(self.frame_features[a:a + _ROWS_PER_CHUNK], key)
            self._gram_cache = (key, gram)
        return self._gram_cache[1]

    def prepare(self, rerank: Optional[Rerank]) -> None:
        """Compute what searching with `rerank` caches (Gram matrices; the IVF lists' members when the
        index reads lists by default), so no query pays for it."""
        self._gram_table(rerank)
        if self.default_probe:
            self.list_members

    def score_rows(self, text_features: torch.Tensor, rows: torch.Tensor,
                   rerank: Optional[Rerank] = None) -> torch.Tensor:
        """Exact scores (Q, len(rows)) of some items, in blocks (cosine with the mean-pooled vector
        when no head is given); sorted rows read the features in order. Gram matrices come from the
        cache when `prepare` (or an exact scan) has filled it, else are computed for these rows."""
        text = self._query(text_features)
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rerank is None:
            unit = torch.nn.functional.normalize(text, dim=-1)
            return unit @ torch.from_numpy(self.pooled[rows.numpy()]).t()
        gram = self._gram_table(rerank, compute=False)
        out = torch.empty(text.shape[0], len(rows))
        block = _Block(self.frame_features, gram, min(_RERANK_ROWS, len(rows)))
        for a in range(0, len(rows), _RERANK_ROWS):
            r = rows[a:a + _RERANK_ROWS]
            out[:, a:a + len(r)] = self._rerank(rerank, text, self._gather(r, block), self.frame_mask[r],
                                                block.grams(r))
        return out

    def _gather(self, rows: torch.Tensor, block: Optional["_Block"] = None) -> torch.Tensor:
        """Frame features of `rows` as float32. Each item's frames are copied as one block of 8-byte
        words (torch's element-wise float16 indexing is slower); `score_rows` calls this on small
        blocks of rows, into buffers it reuses (`_Block`), so that the copies stay in cache and no
        block pays for fresh pages."""
        feats = self.frame_features
        n, f, d = feats.shape
        m = len(rows)
        words = f * d * feats.element_size()
        if feats.is_contiguous() and words % 8 == 0 and feats.data_ptr() % 8 == 0:
            src = feats.view(n, f * d).view(torch.int64)
            picked = src.index_select(0, rows) if block is None else torch.index_select(src, 0, rows, out=block.words[:m])
            half = picked.view(feats.dtype).view(m, f, d)
        else:
            half = feats[rows]
        if block is None:
            return half.float()
        out = block.frames[:m]
        out.copy_(half)
        return out

    @property
    def list_members(self):
        """Item rows of each IVF list of the candidate index (`xmodal.ivf_lists.ListMembers`), read once."""
        if self._list_members is None:
            from xmodal.ivf_lists import ListMembers

            owner = self.frame_vectors.owner if self.candidate_vectors == "frames" else None
            self._list_members = ListMembers(self.faiss, owner)
        return self._list_members

    def probe_candidates(self, text_features: torch.Tensor, probe: int) -> List[np.ndarray]:
        """Per query, the sorted rows of every item with a candidate vector in the `probe` IVF lists
        chosen for it (`xmodal.ivf_lists`: the lists of its best-matching vectors, then of its nearest
        centroids; no top-K cut)."""
        text = torch.nn.functional.normalize(self._query(text_features), dim=-1).numpy()
        members = self.list_members
        return [members.members(lists) for lists in members.choose_lists(self.faiss, text, probe)]

    @staticmethod
    def _rerank(rerank: Rerank, text: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor,
                gram: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The head's scores; a text-conditioned `SimilarityHead` goes through the equivalent
        `text_conditioned_scores` (same numbers to float rounding, a fraction of the memory and time)."""
        with torch.no_grad():
            if getattr(rerank, "pooling", None) == "text_conditioned" and hasattr(rerank, "temperature"):
                return text_conditioned_scores(text, frames, mask, rerank.temperature, rerank.normalize, gram)
            return rerank(text, frames.float(), mask)

    def search(self, text_features: torch.Tensor, k: int = 5, rerank: Optional[Rerank] = None,
               candidates: int = 50, *, exact: bool = False, probe: Optional[int] = None,
               stats: Optional[Dict[str, Any]] = None) -> List[List[Hit]]:
        """Top-k items per query.

        Two-stage (default): FAISS finds `candidates` items per query over the mean-pooled vectors and
        `rerank(text (Q,D), frames (C,F,D), mask (C,F)) -> (Q, C)` re-scores them with a pooling head
        (e.g. text-conditioned pooling). `probe=P` (IVF indices) takes instead every item with a vector
        in P lists (those holding the query's best-matching vectors, then those of its nearest centroids)
        and re-scores all of them;
        `candidates` is then unused.
        `exact=True` scores every item with the head. `stats`, when given, receives "candidates": the
        number of items re-scored for each query.
        """
        if isinstance(k, bool) or int(k) < 1:
            raise XModalError(f"k={k}: expected >= 1")
        if int(candidates) < 1:
            raise XModalError(f"candidates={candidates}: expected >= 1")
        text = self._query(text_features)
        k = min(int(k), len(self))
        results = []
        if exact:
            if stats is not None:
                stats["candidates"] = [len(self)] * text.shape[0]
            scores = self.score_all(text, rerank)
            top = torch.topk(scores, k, dim=1)
            for q in range(text.shape[0]):
                results.append(self._hits(top.indices[q].tolist(), top.values[q].tolist()))
            return results
        if probe is not None:
            probed = self.probe_candidates(text, probe)
            if stats is not None:
                stats["candidates"] = [len(rows) for rows in probed]
            for q, rows in enumerate(probed):
                cand = torch.from_numpy(rows)
                s = self.score_rows(text[q:q + 1], cand, rerank)[0] if len(cand) else torch.zeros(0)
                top = torch.topk(s, min(k, len(cand)))
                results.append(self._hits(cand[top.indices].tolist(), top.values.tolist()))
            return results
        n_cand = min(max(int(candidates), k), len(self)) if rerank is not None else k
        scores, idx = self.candidates(text, n_cand)
        if stats is not None:
            stats["candidates"] = [int((row >= 0).sum()) for row in idx]
        for q in range(text.shape[0]):
            keep = idx[q] >= 0  # FAISS pads with -1 when it finds fewer than asked
            cand = torch.as_tensor(idx[q][keep], dtype=torch.long)
            s = torch.as_tensor(scores[q][keep])
            if rerank is not None and len(cand):
                s = self.score_rows(text[q:q + 1], cand, rerank)[0]
            order = torch.argsort(s, descending=True)[:k]
            results.append(self._hits(cand[order].tolist(), s[order].tolist()))
        return results

    def _hits(self, rows: List[int], scores: List[float]) -> List[Hit]:
        return [Hit(rank=r + 1, id=self.ids[i], media=self.media[i], score=float(s), row=int(i))
                for r, (i, s) in enumerate(zip(rows, scores))]

    # ----------------------------------------------------------- storage
    def save(self, directory) -> Path:
        """Write the whole index folder next to `directory`, then swap it in (old one removed after)."""
        directory = Path(directory).absolute()
        uid = secrets.token_hex(8)
        meta = dict(self.meta)
        if meta.get("adapter"):
            meta["adapter"] = portable_path(meta["adapter"], directory)
        record = {**meta, "format_version": FORMAT_VERSION, "index_uid": uid, "built_at": str(directory),
                  "num_items": len(self), "num_frames": int(self.frame_features.shape[1]), "dim": self.dim,
                  "ids": self.ids, "media": [portable_path(m, directory) for m in self.media]}
        if self.captions is not None:
            record["captions"] = self.captions
        with atomic_directory(directory) as tmp:
            write_safetensors(tmp / FEATURES, {"frame_features": self.frame_features, "frame_mask": self.frame_mask},
                              {"xmodal.index_uid": uid}, {"frame_features": torch.float16, "frame_mask": torch.uint8})
            try:
                faiss.write_index(self.faiss, str(tmp / FAISS_FILE))
            except RuntimeError as exc:
                raise WriteError(f"cannot write {directory / FAISS_FILE}: "
                                 f"{str(exc).strip().splitlines()[-1][:200]}") from None
            record["files"] = {FEATURES: (tmp / FEATURES).stat().st_size, FAISS_FILE: (tmp / FAISS_FILE).stat().st_size}
            text = json.dumps(record, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
            with open(tmp / META, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        return directory

    @classmethod
    def load(cls, directory, *, mmap: Optional[bool] = None, check: bool = True) -> "GalleryIndex":
        """Read an index folder written by `save`; every file is checked against `gallery.json`.

        `mmap=None` memory-maps features above 256 MiB (and the FAISS index with IO_FLAG_MMAP).
        """
        directory = Path(directory)
        for f in (FEATURES, META):
            if not (directory / f).is_file():
                hint = _interrupted_hint(directory)
                raise IndexFileError(f"{directory / f}: not found; build the index with `xmodal index`{hint}")
        from xmodal.folder_files import FolderFileError, file_inside, read_json_file

        meta_path = directory / META
        try:
            for f in (FEATURES, META, FAISS_FILE):
                file_inside(directory, f)  # an index folder holds its own files: a link leaving it is refused
            meta = read_json_file(meta_path, "an index description; rebuild the index with `xmodal index`")
        except FolderFileError as exc:
            raise IndexFileError(str(exc)) from None
        if not isinstance(meta, dict):
            raise IndexFileError(f"{meta_path}: expected a JSON object")
        for key in ("ids", "media"):
            if not isinstance(meta.get(key), list):
                raise IndexFileError(f"{meta_path}: missing or malformed key {key!r} (a list expected)")
        ids, stored_media = meta.pop("ids"), meta.pop("media")
        captions = meta.pop("captions", None)
        if len(stored_media) != len(ids) or (captions is not None and len(captions) != len(ids)):
            raise IndexFileError(f"{meta_path}: {len(ids)} ids but {len(stored_media)} media paths"
                                 + (f" / {len(captions)} caption lists" if captions is not None else ""))
        for name, size in (meta.get("files") or {}).items():
            try:
                path = file_inside(directory, name)
            except FolderFileError as exc:
                raise IndexFileError(str(exc)) from None
            if path.is_file() and path.stat().st_size != size:
                raise IndexFileError(f"{path}: {path.stat().st_size} bytes, {meta_path.name} says {size} "
                                     f"(truncated, or a file of another index); rebuild the index with `xmodal index`")
        feat_path = directory / FEATURES
        use_mmap = feat_path.stat().st_size > MMAP_ABOVE_BYTES if mmap is None else bool(mmap)
        arrays, st_meta = read_safetensors(feat_path, use_mmap)
        if "frame_features" not in arrays or "frame_mask" not in arrays:
            raise IndexFileError(f"{feat_path}: expected tensors 'frame_features' and 'frame_mask', "
                                 f"found {sorted(arrays)}")
        feats, mask = arrays["frame_features"], arrays["frame_mask"]
        if feats.ndim != 3 or mask.shape != feats.shape[:2] or feats.shape[0] != len(ids):
            raise IndexFileError(f"{feat_path}: features {tuple(feats.shape)} / mask {tuple(mask.shape)} do not fit "
                                 f"the {len(ids)} items of {meta_path.name}; rebuild the index with `xmodal index`")
        uid = meta.get("index_uid")
        if uid and st_meta.get("xmodal.index_uid") != uid:
            raise IndexFileError(f"{feat_path}: belongs to another index than {meta_path.name} "
                                 f"(index_uid {st_meta.get('xmodal.index_uid')} != {uid}); rebuild the index")
        index = None
        faiss_path = directory / FAISS_FILE
        if faiss_path.is_file():
            flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if use_mmap else 0
            try:
                index = faiss.read_index(str(faiss_path), flags)
            except RuntimeError as exc:
                raise IndexFileError(f"{faiss_path}: not a readable FAISS index "
                                     f"({str(exc).strip().splitlines()[-1][:160]}); rebuild the index") from None
            if index.d != feats.shape[2]:
                raise IndexFileError(f"{faiss_path}: vectors of dim {index.d}, the features have dim "
                                     f"{feats.shape[2]}; rebuild the index")
            params = (meta.get("faiss") or {}).get("search_params")
            if params:
                set_search_params(index, params)
        elif meta.get("format_version", 1) >= 2:
            raise IndexFileError(f"{faiss_path}: not found; rebuild the index with `xmodal index`")
        built_at = meta.get("built_at")
        base = _media_base(directory, built_at, stored_media)
        media = [m if os.path.isabs(m) else os.path.normpath(os.path.join(base, m)) for m in stored_media]
        if meta.get("adapter"):
            meta["adapter"] = resolve_path(meta["adapter"], directory, built_at)
        meta["index_dir"] = str(directory.absolute())
        try:
            return cls(torch.from_numpy(feats), torch.from_numpy(np.asarray(mask)).bool(), ids, media, meta,
                       captions=captions, faiss_index=index, check=check)
        except IndexFileError:
            raise
        except XModalError as exc:
            raise IndexFileError(f"{directory}: {exc}") from None


def _media_base(directory: Path, built_at: Optional[str], stored: List[str]) -> str:
    """The folder relative media paths hang from: the index folder, or where it was built."""
    here = str(directory.absolute())
    first = next((m for m in stored if not os.path.isabs(m)), None)
    if first is None or not built_at or os.path.exists(os.path.join(here, first)):
        return here
    return built_at if os.path.exists(os.path.join(built_at, first)) else here


def _interrupted_hint(directory: Path) -> str:
    parent = directory.absolute().parent
    if not parent.is_dir():
        return ""
    old = sorted(parent.glob(f".{directory.name}.old-*"))
    if old and not directory.exists():
        return f" (an interrupted rewrite left the previous index at {old[-1]}; rename it back to {directory})"
    return ""


# -------------------------------------------------------------------- search
class Searcher:
    """An index plus the query side it was built for (model, adapter, pooling head), loaded once.

    `searcher.search(["a red car"], k=5)` encodes the queries and runs the two-stage search; the model
    is built in `__init__` only, so a service keeps one Searcher for all requests.
    """

    def __init__(self, index: GalleryIndex, device: str = "cpu"):
        from xmodal.backbones.factory import create_backbone
        from xmodal.engine.heads import SimilarityHead
        from xmodal.methods import AdaptedModel

        meta = index.meta
        missing = [k for k in ("backbone", "head") if k not in meta]
        if missing:
            raise IndexFileError(f"{meta.get('index_dir', 'index')}/{META}: missing {missing}; "
                                 f"rebuild it with `xmodal index`")
        self.index = index
        self.device = device
        self.model = AdaptedModel(create_backbone(meta["backbone"], meta.get("pretrained"), device=device,
                                                  seed=meta.get("seed")))
        if meta.get("adapter"):
            if not Path(meta["adapter"]).exists():
                raise XModalError(f"adapter {meta['adapter']} recorded in the index does not exist "
                                  f"(moved without the index's run folder?)")
            self.model.load_adapter(meta["adapter"])
        self.head = SimilarityHead(**meta["head"])
        self.max_words = meta.get("max_words")

    @classmethod
    def load(cls, directory, device: str = "cpu", mmap: Optional[bool] = None) -> "Searcher":
        return cls(GalleryIndex.load(directory, mmap=mmap), device)

    def encode(self, queries: Sequence[str]) -> torch.Tensor:
        from xmodal.encoding import encode_texts

        return encode_texts(self.model, check_queries(queries), max_words=self.max_words, device=self.device,
                            progress=False)

    def search(self, queries: Sequence[str], k: int = 5, candidates: int = 100, exact: bool = False,
               probe: Optional[int] = None) -> List[List[Hit]]:
        return self.index.search(self.encode(queries), k=k, rerank=self.head, candidates=candidates, exact=exact,
                                 probe=probe)
