"""Gallery encoding and embedding export in clip-retrieval's layout, sharded over torch.distributed.

`xmodal embed` writes, for partition n of N (zero-padded to len(str(N-1)) digits as clip-retrieval does)::

    OUT/embeddings.json                   provenance: model, weights sha256, adapter (+ sha256), head,
                                          frames, data split, partition count (identical for every shard)
    OUT/video_emb/video_emb_{n}.npy       (rows, D) float16, L2-normalised mean-pooled clips
                                          (img_emb/img_emb_{n}.npy when every item is an image)
    OUT/text_emb/text_emb_{n}.npy         (rows, D) float16, L2-normalised, each item's first caption
    OUT/metadata/metadata_{n}.parquet     image_path (the media path), caption, id, captions, kind
    OUT/frame_emb/frame_emb_{n}.npy       (rows, F, D) float16 per-frame features (unnormalised, for
    OUT/frame_mask/frame_mask_{n}.npy     (rows, F) bool               text-conditioned re-ranking)
    OUT/shards/shard_{n}.json             rows written, items dropped for unreadable media

Rows of partition n are a contiguous slice of the split, cut on batch boundaries, so the
concatenation of all partitions is exactly what one process writes. Under
`torchrun --nproc_per_node N` rank r writes partition r; `--shard r/N` does the same on
separate machines without a process group. Files are only ever read with
`np.load(allow_pickle=False)`, parquet and JSON.

`encode_gallery` is the encoding loop `xmodal index` shares: an item whose media is missing or
cannot be decoded is an error naming the count and the first paths, or, with `allow_missing`, is
left out and listed; it never becomes a zero row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from xmodal import errors
from xmodal.atomic import atomic_file, atomic_write_json, ensure_dir
from xmodal.data.items import Item
from xmodal.errors import DataError, XModalError

PROVENANCE = "embeddings.json"
LAYOUT = "clip-retrieval"
#: raised for missing/unreadable media (xmodal.errors.MissingMediaError once the data layer has it)
MissingMediaError = getattr(errors, "MissingMediaError", DataError)
_SHOW_PATHS = 5


# ------------------------------------------------------------------ hashing
def file_sha256(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_provenance(backbone: str, pretrained: Optional[str], cache_dir: Optional[str] = None) -> Dict[str, Any]:
    """Which weights file the backbone was loaded from, with its sha256 (None without weights)."""
    if not pretrained or str(pretrained) == "random":
        return {"pretrained": pretrained, "weights_file": None, "weights_sha256": None}
    from xmodal.backbones.weights import resolve_pretrained

    source = resolve_pretrained(backbone, pretrained, cache_dir=cache_dir)
    path = Path(source.path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    h = hashlib.sha256()
    for f in files:
        h.update(file_sha256(f).encode())
    sha = file_sha256(path) if path.is_file() else h.hexdigest()
    return {"pretrained": pretrained, "weights_file": str(path), "weights_sha256": sha}


def adapter_sha256(adapter: Optional[os.PathLike | str]) -> Optional[str]:
    if not adapter:
        return None
    h = hashlib.sha256()
    for f in sorted(Path(adapter).iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ sharding
def parse_shard(text: str) -> Tuple[int, int]:
    """'i/N' -> (i, N) with 0 <= i < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise XModalError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise XModalError(f"--shard {text!r}: expected 0 <= i < N")
    return i, n


def shard_rows(n_items: int, rank: int, world: int, batch_size: int) -> range:
    """Contiguous rows of partition `rank`, cut on multiples of `batch_size` so every batch is the one a
    single process would encode (the same batches give bit-identical features)."""
    batches = math.ceil(n_items / batch_size)
    per = math.ceil(batches / world) * batch_size
    return range(min(n_items, rank * per), min(n_items, (rank + 1) * per))


def shard_name(n: int, count: int) -> str:
    """clip-retrieval's partition suffix: zero-padded to int(log10(count)) + 1 digits."""
    return str(n).zfill(int(math.log10(max(count, 1))) + 1)


# ------------------------------------------------------------------ media
def missing_media_message(what: str, bad: Sequence[Tuple[str, str]], total: int) -> str:
    shown = ", ".join(f"{path} ({reason})" for path, reason in bad[:_SHOW_PATHS])
    more = f" and {len(bad) - _SHOW_PATHS} more" if len(bad) > _SHOW_PATHS else ""
    return (f"{what}: {len(bad)} of {total} items have missing or unreadable media: {shown}{more}; "
            f"fix the files, or pass --allow-missing to proceed on the readable ones (the result is marked partial)")


def check_media_files(items: Sequence[Item]) -> List[int]:
    """Indices of items whose media file does not exist."""
    return [i for i, it in enumerate(items) if not os.path.isfile(it.media)]


@dataclass
class EncodedGallery:
    """Per-frame features of the readable items, in item order, and what was left out."""

    items: List[Item]
    frames: torch.Tensor  # (N, F, D) float32
    mask: torch.Tensor  # (N, F) bool
    dropped: List[Dict[str, str]] = field(default_factory=list)  # {"id", "media", "reason"}

    @property
    def partial(self) -> bool:
        return bool(self.dropped)


def encode_gallery(model, items: Sequence[Item], load_visual, num_frames: int, *, batch_size: int = 16,
                   num_workers: int = 0, device=None, progress: Optional[bool] = None) -> EncodedGallery:
    """Encode items (whose media files exist) -> features of the decodable ones + the others, dropped.

    The caller decides whether a drop is an error (`raise_if_dropped`); no row is ever zero-filled.
    """
    from torch.utils.data import DataLoader

    from xmodal.data.dataset import VisualDataset, collate
    from xmodal.encoding import encode_loader

    items = list(items)
    dim = model.backbone.embed_dim if hasattr(model, "backbone") else model.embed_dim
    if not items:
        return EncodedGallery([], torch.zeros(0, num_frames, dim), torch.zeros(0, num_frames, dtype=torch.bool))
    visuals = VisualDataset(items, load_visual, num_frames, strict=False)
    loader = DataLoader(visuals, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    batches = (b for b in loader if b is not None)
    try:
        frames, mask, index = encode_loader(model, _Sized(batches, len(loader)), device=device, progress=progress,
                                            return_index=True)
    except XModalError as exc:
        if "yielded no batches" not in str(exc):
            raise
        frames, mask, index = torch.zeros(0, num_frames, dim), torch.zeros(0, num_frames, dtype=torch.bool), \
            torch.zeros(0, dtype=torch.long)
    order = torch.argsort(index)
    frames, mask, index = frames[order], mask[order], index[order]
    kept = set(index.tolist())
    reasons = visuals.failures
    dropped = [{"id": it.id, "media": it.media, "reason": reasons.get(it.media, "could not be decoded")}
               for i, it in enumerate(items) if i not in kept]
    return EncodedGallery([items[i] for i in index.tolist()], frames, mask, dropped)


class _Sized:
    def __init__(self, it, n):
        self.it, self.n = it, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(self.it)


def raise_if_dropped(what: str, dropped: Sequence[Dict[str, str]], total: int, allow_missing: bool) -> None:
    if dropped and not allow_missing:
        raise MissingMediaError(missing_media_message(what, [(d["media"], d["reason"]) for d in dropped], total))


def read_gallery(cfg, model, allow_missing: bool, log=print) -> Tuple[List[Item], List[Dict[str, str]], Any]:
    """Items of the configured split whose media files exist, the missing ones, and the frame loader.

    Missing files are an error (count + first paths) unless `allow_missing`.
    """
    from xmodal.data import read_dataset
    from xmodal.engine.train import visual_loader

    d = cfg.data
    spec = read_dataset(d.dataset, d.root, d.eval_split, drop_missing=False, **d.options)
    items = spec.items[: d.max_eval_items] if d.max_eval_items else spec.items
    if not items:
        raise DataError(f"{d.dataset} split {d.eval_split!r} under {d.root!r}: no items")
    missing = check_media_files(items)
    what = f"{d.dataset} split {d.eval_split!r} under {d.root}"
    dropped = [{"id": items[i].id, "media": items[i].media, "reason": "file not found"} for i in missing]
    raise_if_dropped(what, dropped, len(items), allow_missing)
    gone = set(missing)
    return [it for i, it in enumerate(items) if i not in gone], dropped, visual_loader(cfg, model)


# ------------------------------------------------------------------ provenance
def provenance(cfg, adapter: Optional[str], kind: str, dim: int, num_items: int, partitions: int) -> Dict[str, Any]:
    """Everything that decides the numbers in the shards (identical on every rank)."""
    from xmodal import __version__

    d = cfg.data
    record = {
        "layout": LAYOUT, "xmodal_version": __version__, "backbone": cfg.model.backbone,
        **weights_provenance(cfg.model.backbone, cfg.model.pretrained, cfg.model.cache_dir),
        "seed": cfg.train.seed,
        "adapter": str(Path(adapter).resolve()) if adapter else None, "adapter_sha256": adapter_sha256(adapter),
        "head": {"pooling": cfg.head.pooling, "temperature": cfg.head.temperature, "normalize": cfg.head.normalize},
        "max_words": d.max_words, "num_frames": d.num_frames, "fps": d.fps, "frame_cache": d.frame_cache,
        "dataset": d.dataset, "root": str(Path(d.root).resolve()), "split": d.eval_split,
        "max_items": d.max_eval_items, "num_items": num_items, "kind": kind, "dim": dim,
        "partition_count": partitions, "embedding_dtype": "float16",
        "visual_emb": f"{emb_name(kind)}/{emb_name(kind)}_{{n}}.npy",
        "normalized": {"visual_emb": True, "text_emb": True, "frame_emb": False},
    }
    record["provenance_id"] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    return record


def emb_name(kind: str) -> str:
    return "img_emb" if kind == "image" else "video_emb"


# ------------------------------------------------------------------ writing
def _save_npy(path: Path, array: np.ndarray) -> None:
    ensure_dir(path.parent)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def _save_parquet(path: Path, rows: Dict[str, list]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ensure_dir(path.parent)
    table = pa.table({
        "image_path": pa.array(rows["image_path"], pa.string()), "caption": pa.array(rows["caption"], pa.string()),
        "id": pa.array(rows["id"], pa.string()), "captions": pa.array(rows["captions"], pa.list_(pa.string())),
        "kind": pa.array(rows["kind"], pa.string()),
    })
    with atomic_file(path) as tmp:
        pq.write_table(table, str(tmp))


def check_output(out: Path, record: Dict[str, Any]) -> None:
    """Refuse to mix shards of different runs in one folder."""
    prov = out / PROVENANCE
    if prov.is_file():
        try:
            old = json.loads(prov.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("provenance_id") != record["provenance_id"]:
            raise XModalError(f"{out} holds embeddings of another run (provenance {old.get('provenance_id')} != "
                              f"{record['provenance_id']}); choose an empty folder or remove it")


def write_partition(out: Path, n: int, record: Dict[str, Any], enc: EncodedGallery, text_emb: torch.Tensor,
                    rows_range: range, dropped: List[Dict[str, str]]) -> None:
    """Write partition n: embeddings, metadata, per-frame features, then its shard record (last)."""
    from xmodal.engine.heads import mean_pool

    count = record["partition_count"]
    tag = shard_name(n, count)
    emb = emb_name(record["kind"])
    pooled = mean_pool(enc.frames, enc.mask) if len(enc.items) else torch.zeros(0, record["dim"])
    text = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    _save_npy(out / emb / f"{emb}_{tag}.npy", pooled.half().numpy())
    _save_npy(out / "text_emb" / f"text_emb_{tag}.npy", text.half().numpy())
    if record["kind"] != "image":
        _save_npy(out / "frame_emb" / f"frame_emb_{tag}.npy", enc.frames.half().numpy())
        _save_npy(out / "frame_mask" / f"frame_mask_{tag}.npy", enc.mask.numpy())
    _save_parquet(out / "metadata" / f"metadata_{tag}.parquet", {
        "image_path": [it.media for it in enc.items], "caption": [it.captions[0] if it.captions else "" for it in enc.items],
        "id": [it.id for it in enc.items], "captions": [list(it.captions) for it in enc.items],
        "kind": [it.kind for it in enc.items]})
    atomic_write_json(out / PROVENANCE, record)
    atomic_write_json(out / "shards" / f"shard_{tag}.json", {
        "partition": n, "partition_count": count, "provenance_id": record["provenance_id"],
        "first_item": rows_range.start, "stop_item": rows_range.stop, "rows": len(enc.items),
        "dropped": dropped})


# ------------------------------------------------------------------ reading
@dataclass
class EmbeddingSet:
    """All partitions of an embedding folder, concatenated in partition order."""

    provenance: Dict[str, Any]
    frames: torch.Tensor  # (N, F, D) float16 (images: the normalised img_emb as one frame)
    mask: torch.Tensor  # (N, F) bool
    visual: np.ndarray  # (N, D) float16, normalised
    text: np.ndarray  # (N, D) float16, normalised
    ids: List[str]
    media: List[str]
    captions: List[List[str]]
    dropped: List[Dict[str, str]]

    @property
    def partial(self) -> bool:
        return bool(self.dropped)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise XModalError(f"{path}: not found (did that partition finish?)")
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:
        raise XModalError(f"{path}: not a readable .npy array ({str(exc)[:160]})") from None


def read_embeddings(directory: os.PathLike | str) -> EmbeddingSet:
    """Read and cross-check every partition of an `xmodal embed` folder."""
    import pyarrow.parquet as pq

    root = Path(directory)
    prov_path = root / PROVENANCE
    if not prov_path.is_file():
        raise XModalError(f"{prov_path}: not found; write embeddings with `xmodal embed --out {root}`")
    try:
        prov = json.loads(prov_path.read_text())
        count, kind, dim, pid = prov["partition_count"], prov["kind"], prov["dim"], prov["provenance_id"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise XModalError(f"{prov_path}: not an xmodal embeddings record ({exc})") from None
    emb = emb_name(kind)
    parts: Dict[str, list] = {k: [] for k in ("frames", "mask", "visual", "text")}
    ids: List[str] = []
    media: List[str] = []
    captions: List[List[str]] = []
    dropped: List[Dict[str, str]] = []
    next_item = 0
    for n in range(count):
        tag = shard_name(n, count)
        shard_path = root / "shards" / f"shard_{tag}.json"
        if not shard_path.is_file():
            raise XModalError(f"{shard_path}: not found: partition {n} of {count} is missing (did it finish?)")
        try:
            shard = json.loads(shard_path.read_text())
            rows = int(shard["rows"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise XModalError(f"{shard_path}: malformed shard record ({exc})") from None
        if shard.get("provenance_id") != pid:
            raise XModalError(f"{shard_path}: written by another run (provenance {shard.get('provenance_id')} != {pid})")
        if shard.get("first_item") != next_item:
            raise XModalError(f"{shard_path}: starts at item {shard.get('first_item')}, expected {next_item}")
        next_item = shard["stop_item"]
        arrays = {"visual": _load_npy(root / emb / f"{emb}_{tag}.npy"),
                  "text": _load_npy(root / "text_emb" / f"text_emb_{tag}.npy")}
        if kind != "image":
            arrays["frames"] = _load_npy(root / "frame_emb" / f"frame_emb_{tag}.npy")
            arrays["mask"] = _load_npy(root / "frame_mask" / f"frame_mask_{tag}.npy")
        else:
            arrays["frames"] = arrays["visual"][:, None, :]
            arrays["mask"] = np.ones((arrays["visual"].shape[0], 1), dtype=bool)
        for name, a in arrays.items():
            if a.shape[0] != rows or (name != "mask" and a.shape[-1] != dim):
                raise XModalError(f"{root}: partition {n} {name} has shape {a.shape}, expected {rows} rows of dim {dim}")
            parts[name].append(a)
        meta_path = root / "metadata" / f"metadata_{tag}.parquet"
        try:
            table = pq.read_table(meta_path).to_pydict()
        except Exception as exc:  # pyarrow raises several types for missing/garbage files
            raise XModalError(f"{meta_path}: not a readable parquet file ({str(exc)[:160]})") from None
        if len(table.get("id", [])) != rows:
            raise XModalError(f"{meta_path}: {len(table.get('id', []))} rows, the partition has {rows}")
        ids += table["id"]
        media += table["image_path"]
        captions += [list(c) for c in table["captions"]]
        dropped += list(shard.get("dropped", []))
    if next_item != prov.get("num_items"):
        raise XModalError(f"{root}: partitions cover {next_item} items, {PROVENANCE} says {prov.get('num_items')}")
    f = max((a.shape[1] for a in parts["frames"]), default=1)
    frames = torch.cat([_pad(torch.from_numpy(np.array(a, dtype=np.float16)), f) for a in parts["frames"]])
    mask = torch.cat([_pad(torch.from_numpy(np.array(a, dtype=bool)), f) for a in parts["mask"]])
    return EmbeddingSet(prov, frames, mask, np.concatenate(parts["visual"]), np.concatenate(parts["text"]),
                        ids, media, captions, dropped)


def _pad(x: torch.Tensor, f: int) -> torch.Tensor:
    if x.shape[1] == f:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], f - x.shape[1]) + tuple(x.shape[2:]))], dim=1)
