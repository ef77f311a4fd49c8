"""An index folder as the service sees it: items (id, media file, kind, captions), model, head.

Glue over `xmodal.retrieval_index` that reads only the index folder's documented files
(`gallery.json`, `frame_features.safetensors` via `GalleryIndex.load`):

* media paths are used as stored when absolute, else resolved against the index folder;
* the adapter path likewise (`gallery.json` "adapter");
* captions come from `gallery.json` "captions" (one string or list of strings per item) when
  the index recorded them; without them an index serves visual search only and says so;
* frame timestamps for moments use `gallery.json` "fps" when recorded, else the sampling
  default of 1 fps, and "segments" ([start, end] per item) when recorded, else whole files
  (every /search answer says which);
* `media_root` is the folder every served file must lie in after resolving symlinks: by
  default the deepest folder holding all registered media.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from xmodal.errors import XModalError


@dataclass
class Item:
    row: int
    id: str
    media: str  # absolute, normalised (symlinks NOT resolved)
    kind: str  # "video" | "image"
    captions: List[str]
    segment: Tuple[Optional[float], Optional[float]] = (None, None)  # (start, end) seconds within the file


def _resolve(path: str, base: Path) -> str:
    p = Path(os.path.expanduser(str(path)))
    return os.path.normpath(str(p if p.is_absolute() else base / p))


def _segments(meta: Dict[str, Any], n: int, where: str) -> List[Tuple[Optional[float], Optional[float]]]:
    """`gallery.json` "segments": one [start, end] (either may be null) or null per item; default whole files."""
    raw = meta.get("segments")
    if raw is None:
        return [(None, None)] * n
    if not isinstance(raw, list) or len(raw) != n:
        raise XModalError(f"{where}: 'segments' must be a list with one [start, end] or null per item ({n})")
    out = []
    for i, seg in enumerate(raw):
        if seg is None:
            out.append((None, None))
            continue
        ok = isinstance(seg, (list, tuple)) and len(seg) == 2 and all(
            x is None or (isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0) for x in seg)
        if not ok:
            raise XModalError(f"{where}: segments[{i}] must be [start, end] in seconds (null for open ends)")
        out.append((None if seg[0] is None else float(seg[0]), None if seg[1] is None else float(seg[1])))
    return out


def _captions(meta: Dict[str, Any], n: int, where: str) -> Optional[List[List[str]]]:
    raw = meta.get("captions")
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) != n:
        got = f"{len(raw)} entries" if isinstance(raw, list) else type(raw).__name__
        raise XModalError(f"{where}: 'captions' must be a list with one entry per item ({n}), got {got}")
    out = []
    for i, c in enumerate(raw):
        caps = [c] if isinstance(c, str) else c
        if not isinstance(caps, list) or not all(isinstance(s, str) for s in caps):
            raise XModalError(f"{where}: captions[{i}] must be a string or a list of strings")
        out.append(list(caps))
    return out


@dataclass
class ServedIndex:
    """One loaded index: the GalleryIndex, its items, its query encoder and pooling head."""

    name: str
    directory: Path
    gallery: Any  # xmodal.retrieval_index.GalleryIndex
    items: List[Item]
    encoder: Any  # xmodal.serve.models.Encoder
    head: Any  # xmodal.engine.heads.SimilarityHead
    media_root: str
    fps: float
    fps_recorded: bool
    by_id: Dict[str, int] = field(default_factory=dict)
    caption_rows: Optional[torch.Tensor] = None  # (C,) item row of each caption
    caption_features: Optional[torch.Tensor] = None  # (C, D) L2-normalised
    caption_texts: List[str] = field(default_factory=list)  # (C,)
    _times: Dict[Tuple, Optional[List[float]]] = field(default_factory=dict)  # (media, start, end) -> times
    _times_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self):
        self.by_id = {it.id: it.row for it in self.items}

    @property
    def has_captions(self) -> bool:
        return self.caption_features is not None

    @property
    def num_frames(self) -> int:
        return int(self.gallery.frame_features.shape[1])

    def item(self, item_id: str) -> Optional[Item]:
        row = self.by_id.get(item_id)
        return None if row is None else self.items[row]

    def describe(self) -> Dict[str, Any]:
        meta = self.gallery.meta
        kinds = {k: sum(it.kind == k for it in self.items) for k in ("video", "image")}
        return {"name": self.name, "items": len(self.items), "videos": kinds["video"], "images": kinds["image"],
                "frames_per_item": self.num_frames, "backbone": meta.get("backbone"),
                "pretrained": meta.get("pretrained"), "adapter": meta.get("adapter"),
                "pooling": self.head.pooling, "captions": self.has_captions}

    def frame_times(self, row: int) -> Optional[List[float]]:
        """Timestamps of the item's real frames; None when they cannot be known exactly.

        By the sampling rule, a clip with fewer real frames than the index's frame budget kept every
        point of its 1/fps grid, so its times are k/fps without opening the file; a full clip's grid
        depends on the video's duration, read once from the container header (cached per file).
        """
        from xmodal.serve.moments import sampled_frame_times

        item = self.items[row]
        real = int(self.gallery.frame_mask[row].sum())
        if item.kind != "video":
            return [0.0]
        start, end = item.segment
        if real < self.num_frames:
            return [round((start or 0.0) + k / self.fps, 6) for k in range(real)]
        key = (item.media, start, end)
        with self._times_lock:
            cached = key in self._times
            times = self._times.get(key)
        if not cached:
            times = sampled_frame_times(item.media, self.fps, self.num_frames, start, end)
            with self._times_lock:
                self._times[key] = times
        return times if times is not None and len(times) == real else None


def encode_captions(index: ServedIndex, batch_size: int = 256) -> None:
    """Encode every caption once with the index's model (for `modality: "text"` searches)."""
    rows, texts = [], []
    for it in index.items:
        for c in it.captions:
            rows.append(it.row)
            texts.append(c)
    if not texts:
        return
    parts = [index.encoder.encode_text(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)]
    feats = torch.nn.functional.normalize(torch.cat(parts).float(), dim=-1)
    index.caption_rows = torch.as_tensor(rows, dtype=torch.long)
    index.caption_features = feats
    index.caption_texts = texts


def default_media_root(paths: Sequence[str]) -> str:
    """The deepest folder that holds every registered media file."""
    if not paths:
        return os.sep
    return os.path.commonpath([os.path.dirname(p) for p in paths])


def load_index(name: str, directory, registry, media_root: Optional[str] = None) -> ServedIndex:
    """Load `directory` (built by `xmodal index`) and attach the shared encoder for its model."""
    from xmodal.data.media import is_image_path
    from xmodal.engine.heads import SimilarityHead
    from xmodal.retrieval_index import GalleryIndex

    directory = Path(directory)
    gallery = GalleryIndex.load(directory)
    where = str(directory / "gallery.json")
    meta = gallery.meta
    if "head" not in meta:
        raise XModalError(f"{where}: missing 'head'; rebuild the index with `xmodal index`")
    try:
        head = SimilarityHead(**meta["head"])
    except TypeError as exc:
        raise XModalError(f"{where}: 'head' is not a pooling head description ({exc})") from None
    gallery.prepare(head)  # the re-rank's cached Gram matrices and list members, before the first request
    stored = getattr(gallery, "captions", None)  # GalleryIndex keeps captions itself since format 2
    captions = _captions({"captions": stored} if stored is not None else meta, len(gallery.ids), where)
    media = [_resolve(m, directory) for m in gallery.media]
    segments = _segments(meta, len(gallery.ids), where)
    items = [Item(row=i, id=str(gallery.ids[i]), media=media[i], kind="image" if is_image_path(media[i]) else "video",
                  captions=captions[i] if captions else [], segment=segments[i]) for i in range(len(media))]
    if len({it.id for it in items}) != len(items):
        raise XModalError(f"{where}: item ids are not unique; each id must name one item")
    adapter = _resolve(meta["adapter"], directory) if meta.get("adapter") else None
    if adapter is not None and not Path(adapter).is_dir():
        raise XModalError(f"{where}: adapter folder {adapter} not found (recorded as {meta['adapter']!r})")
    encoder = registry.encoder_for(meta, Path(adapter) if adapter else None, where)
    fps = meta.get("fps")
    index = ServedIndex(name=name, directory=directory, gallery=gallery, items=items, encoder=encoder, head=head,
                        media_root=os.path.normpath(os.path.abspath(media_root)) if media_root
                        else default_media_root(media), fps=float(fps or 1.0), fps_recorded=fps is not None)
    if captions:
        encode_captions(index)
    return index


def parse_index_args(specs: Sequence[str]) -> List[Tuple[str, Path]]:
    """`DIR` or `NAME=DIR` -> (name, dir); names default to the folder name and must be unique."""
    out: List[Tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        directory = Path(path)
        name = name or directory.resolve().name
        if not name or any(c in name for c in "/\\?#%") or name in (".", ".."):
            raise XModalError(f"index name {name!r} (from {spec!r}): use letters, digits, '-', '_' or '.'")
        if any(name == n for n, _ in out):
            raise XModalError(f"two indices are named {name!r}; name them with NAME=DIR, e.g. {name}2={path}")
        if not directory.is_dir():
            raise XModalError(f"{directory}: index folder not found")
        out.append((name, directory))
    if not out:
        raise XModalError("give at least one index folder built by `xmodal index`")
    return out


def caption_search(index: ServedIndex, query: torch.Tensor, k: int) -> List[Tuple[int, float, str]]:
    """Best-matching caption per item for a query vector: [(item row, cosine, caption)], best first."""
    q = torch.nn.functional.normalize(query.float().reshape(1, -1), dim=-1)[0]
    scores = index.caption_features @ q
    order = torch.argsort(scores, descending=True).tolist()
    seen, out = set(), []
    for i in order:
        row = int(index.caption_rows[i])
        if row in seen:
            continue
        seen.add(row)
        out.append((row, float(scores[i]), index.caption_texts[i]))
        if len(out) == k:
            break
    return out


__all__ = ["Item", "ServedIndex", "load_index", "parse_index_args", "caption_search", "default_media_root",
           "encode_captions"]
