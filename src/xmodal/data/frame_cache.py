"""The frame cache: every item decoded once at `fps`, kept losslessly (.npy) or, on request, as JPEGs.

Layout of a cache directory:
    index.json            {"version": 1, "items": {item id: entry}}, written atomically
    <item dir>/frames.npy (format "npy", uint8 N,H,W,3; the default) or <item dir>/000.jpg.. ("jpeg")
    extract_summary.json  counts, throughput and per-clip decode times of the last `extract_frames` run

An entry records the source path with its mtime/size (a changed source makes the entry
stale), the segment, fps, frame count and each frame's timestamp. Frames are the ones
`media.decode_frames` picks (num_frames 0 = the whole 1-fps grid), with the shorter side
reduced to `size` (never enlarged) by the same bicubic resize CLIP's transform uses.

Lossless means: what the model sees from the cache equals what it sees from decoding, bit for
bit. That holds for "npy" entries read with a transform whose input size is the entry's `size`
(the transform's own resize is then a no-op), or whose frames were never shrunk. Any other use
(another input size: a second resize; a sub-segment or another frame budget that the stored
frames cannot reproduce exactly) is either refused with an XModalError or decoded directly,
never served approximately. JPEG caches are lossy: `describe()` says so for provenance.
`open_frame_cache(path)` is the read entry point; a path that does not exist is an error.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from xmodal.atomic import WriteError, atomic_directory, atomic_write_json, ensure_dir
from xmodal.data.media import (
    DecodedFrames,
    MediaError,
    check_fps,
    decode_frames,
    is_image_path,
    read_image_array,
    uniform_indices,
)
from xmodal.errors import XModalError

log = logging.getLogger("xmodal.frame_cache")

INDEX_NAME = "index.json"
SUMMARY_NAME = "extract_summary.json"
INDEX_VERSION = 1
FORMATS = ("npy", "jpeg")
DEFAULT_FORMAT = "npy"
LOSSLESS_FORMATS = frozenset({"npy"})
JPEG_QUALITY = 90
_SAVE_EVERY_S = 10.0  # resumability: the index is rewritten at least this often
REQUIRED_KEYS = ("dir", "source", "kind", "mtime_ns", "size_bytes", "format", "frames", "timestamps",
                 "duration", "fps", "num_frames", "size", "start", "end")


class FrameCacheError(XModalError):
    """A frame cache is missing, malformed, or cannot give what the model would see from decoding."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Kept for callers of the old name: `xmodal.atomic.atomic_write_json`."""
    atomic_write_json(path, data, indent=1)


def source_stat(path: str) -> Tuple[int, int]:
    """(mtime in ns, size in bytes) of a source file: what staleness is judged by."""
    st = os.stat(path)
    return int(st.st_mtime_ns), int(st.st_size)


def _source_key(path: str) -> str:
    return os.path.realpath(os.path.abspath(str(path)))


def item_dirname(item_id: str) -> str:
    """A file-system-safe directory name for an item id (a hash suffix keeps it unique)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", str(item_id))[:100]
    if safe != str(item_id) or safe.startswith(".") or not safe:
        safe = f"{safe.lstrip('.') or 'item'}-{hashlib.sha1(str(item_id).encode()).hexdigest()[:10]}"
    return safe


def resize_shorter(frame: np.ndarray, size: int) -> np.ndarray:
    """Shrink so the shorter side is `size` (bicubic, same output size rule as torchvision)."""
    h, w = frame.shape[:2]
    if not size or min(h, w) <= size:
        return frame
    from PIL import Image

    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    return np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC))


def _same(a: Optional[float], b: Optional[float]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(float(a) - float(b)) < 1e-6


class FrameCache:
    """Read side of a cache directory: look entries up by item id or source path, read frames.

    `create=True` is for the writer (`extract_frames`): a missing folder is an empty cache.
    Otherwise the folder and its index.json must exist (a mistyped path is an error, not a
    silent re-decode of everything).
    """

    def __init__(self, root: str | os.PathLike, check_source: bool = True, *, create: bool = False):
        self.root = Path(root)
        self.check_source = check_source
        self.create = create
        self.items: Dict[str, Dict[str, Any]] = {}
        self._by_source: Dict[str, List[str]] = {}
        self._warned_lossy = False
        if not create:
            if not self.root.is_dir():
                raise FrameCacheError(f"frame cache {self.root} does not exist (data.frame_cache / --frame-cache); "
                                      f"build it with `xmodal extract-frames ... --out {self.root}`")
            if not self.index_path.is_file():
                raise FrameCacheError(f"frame cache {self.root} has no {INDEX_NAME}; expected a folder written by "
                                      f"`xmodal extract-frames`")
        self.reload()

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def reload(self) -> None:
        """(Re)read index.json; a missing index is an empty cache (only when creating)."""
        self.items = {}
        if self.index_path.exists():
            try:
                data = json.loads(self.index_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise FrameCacheError(f"{self.index_path}: not a readable JSON frame-cache index ({exc})") from None
            if not isinstance(data, dict) or not isinstance(data.get("items"), dict):
                raise FrameCacheError(f"{self.index_path}: expected an object with an 'items' mapping")
            if data.get("version") != INDEX_VERSION:
                raise FrameCacheError(f"{self.index_path}: index version {data.get('version')!r}, "
                                      f"expected {INDEX_VERSION}")
            for item_id, entry in data["items"].items():
                if not isinstance(entry, dict):
                    raise FrameCacheError(f"{self.index_path}: entry {item_id!r} is not an object")
                missing = [k for k in REQUIRED_KEYS if k not in entry]
                if missing:
                    raise FrameCacheError(f"{self.index_path}: entry {item_id!r} lacks {', '.join(missing)}; "
                                          f"rebuild the cache with `xmodal extract-frames`")
                folder = entry["dir"]
                if (not isinstance(folder, str) or folder in ("", ".", "..") or "/" in folder or "\\" in folder
                        or os.path.isabs(folder)):
                    raise FrameCacheError(f"{self.index_path}: entry {item_id!r} has dir {folder!r}, outside the "
                                          f"cache folder; expected the name of a sub-folder")
            self.items = data["items"]
        self._rebuild_sources()

    def _rebuild_sources(self) -> None:
        self._by_source = {}
        for item_id, entry in self.items.items():
            self._by_source.setdefault(_source_key(entry["source"]), []).append(item_id)

    def put(self, item_id: str, entry: Dict[str, Any]) -> None:
        old = self.items.get(item_id)
        if old is not None:
            ids = self._by_source.get(_source_key(old["source"]), [])
            if item_id in ids:
                ids.remove(item_id)
        self.items[item_id] = entry
        self._by_source.setdefault(_source_key(entry["source"]), []).append(item_id)

    def save(self) -> None:
        ensure_dir(self.root)
        atomic_write_json(self.index_path, {"version": INDEX_VERSION, "items": self.items}, indent=1)

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.items

    def entry(self, item_id: str) -> Optional[Dict[str, Any]]:
        return self.items.get(item_id)

    # ------------------------------------------------------------- provenance
    def formats(self) -> List[str]:
        return sorted({str(e["format"]) for e in self.items.values()})

    @property
    def lossless(self) -> bool:
        """Every entry is stored without loss (npy); False when any is JPEG."""
        return all(e["format"] in LOSSLESS_FORMATS for e in self.items.values())

    def describe(self) -> Dict[str, Any]:
        """{"path", "format", "lossless"} for a result's provenance ("mixed" when formats differ)."""
        formats = self.formats()
        fmt = formats[0] if len(formats) == 1 else ("mixed" if formats else "empty")
        return {"path": str(self.root.resolve()), "format": fmt, "lossless": self.lossless}

    # ------------------------------------------------------------- lookup
    def is_fresh(self, entry: Dict[str, Any]) -> bool:
        """The source still has the mtime and size it had when the entry was written."""
        if not self.check_source:
            return True
        try:
            return source_stat(entry["source"]) == (entry["mtime_ns"], entry["size_bytes"])
        except OSError:
            return False

    def find(self, path: str, fps: float = 1.0, start: Optional[float] = None,
             end: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """A fresh entry of `path` at `fps` for exactly the segment [start, end)."""
        for item_id in self._by_source.get(_source_key(path), []):
            entry = self.items[item_id]
            if entry["kind"] == "video" and abs(entry["fps"] - fps) > 1e-6:
                continue
            if entry["kind"] == "video" and not (_same(entry["start"], start) and _same(entry["end"], end)):
                continue
            if self.is_fresh(entry):
                return entry
        return None

    def read(self, entry: Dict[str, Any], indices: Optional[Sequence[int]] = None) -> DecodedFrames:
        """Cached frames of an entry (all, or those at `indices`); MediaError naming a broken file."""
        folder = self.root / entry["dir"]
        n = int(entry["frames"])
        indices = list(range(n)) if indices is None else [int(i) for i in indices]
        if entry["format"] == "npy":
            file = folder / "frames.npy"
            try:
                stored = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise MediaError(str(file), f"unreadable cached frames ({exc})") from None
            if stored.dtype != np.uint8 or stored.ndim != 4 or len(stored) != n:
                raise MediaError(str(file), f"expected uint8 frames ({n}, H, W, 3), got "
                                            f"{stored.dtype} {stored.shape}")
            frames = np.ascontiguousarray(stored[indices])
        else:
            from PIL import Image

            arrays = []
            for i in indices:
                file = folder / f"{i:03d}.jpg"
                try:
                    with Image.open(file) as img:
                        arrays.append(np.asarray(img.convert("RGB")))
                except (OSError, ValueError, SyntaxError) as exc:
                    raise MediaError(str(file), f"unreadable cached frame ({exc})") from None
            frames = np.stack(arrays)
        times = entry["timestamps"]
        return DecodedFrames(frames=frames, timestamps=[float(times[i]) for i in indices],
                             duration=entry["duration"])

    def _check_size(self, item_id: str, entry: Dict[str, Any], size: Optional[int]) -> None:
        """Refuse frames that the model's transform would resize a second time (they differ from decoding)."""
        stored = int(entry.get("size") or 0)
        if not stored:
            return  # original resolution
        source_short = entry.get("source_short_side")
        if source_short is not None and int(source_short) <= stored:
            return  # never shrunk: identical to the decoded frames
        if size is not None and size == stored:
            return  # the transform's resize is a no-op on them
        wanted = ("the raw decoded frames (no transform)" if size is None else
                  "a transform of unknown input size" if size < 0 else f"a model input size of {size}px")
        fix = f"; rebuild it with `xmodal extract-frames --size {size}`" if size and size > 0 else ""
        raise FrameCacheError(f"frame cache {self.root}: entry {item_id!r} holds frames shrunk to {stored}px, "
                              f"but {wanted} was requested; resizing them again would not equal decoding{fix}")

    def sample(self, path: str, num_frames: Optional[int] = 12, fps: float = 1.0,
               start: Optional[float] = None, end: Optional[float] = None, *,
               size: Optional[int] = None) -> Optional[DecodedFrames]:
        """The frames `decode_frames` would pick, from the cache; None when it cannot give exactly those.

        `size` is the input size of the transform that will be applied (None: no transform,
        -1: unknown); frames stored at another size raise FrameCacheError (see module doc).
        Served: the entry of exactly this segment and fps when it holds the whole 1/fps grid
        (any frame budget is a uniform subsample of it, as in the decoder) or exactly this
        budget. Anything else (a sub-segment, another budget) is None: decode directly.
        Only the frames picked are read.
        """
        fps = check_fps(fps)
        entry = self.find(path, fps=fps, start=start, end=end)
        if entry is None:
            return None
        item_id = next((k for k in self._by_source.get(_source_key(path), []) if self.items[k] is entry), path)
        n = int(entry["frames"])
        if entry["kind"] == "image":
            keep = [0]
        else:
            stored_budget = int(entry["num_frames"] or 0)
            # the whole grid is stored (nothing subsampled, no tail dropped): any budget is exact
            full_grid = entry.get("grid", n if stored_budget == 0 else -1) == n
            if full_grid:
                keep = uniform_indices(n, num_frames)
            elif stored_budget == int(num_frames or 0):
                keep = list(range(n))
            else:
                return None
        self._check_size(item_id, entry, size)
        if entry["format"] not in LOSSLESS_FORMATS and not self._warned_lossy:
            self._warned_lossy = True
            log.warning("frame cache %s stores %s (lossy) frames: pixels differ from decoding", self.root,
                        entry["format"])
        try:
            return self.read(entry, keep)
        except MediaError as exc:
            log.warning("ignoring broken cache entry for %s: %s", path, exc)
            return None


def open_frame_cache(path: str | os.PathLike, *, check_source: bool = True) -> FrameCache:
    """Open an existing cache for reading (the `--frame-cache PATH` / `data.frame_cache` entry point).

    A path that does not exist, or holds no index.json, is a one-line FrameCacheError.
    """
    return FrameCache(path, check_source=check_source)


# --------------------------------------------------------------------------- writing
def _item_fields(obj: Any) -> Dict[str, Any]:
    """id/media/kind/start/end of an Item-like object, a mapping, or a plain path."""
    if isinstance(obj, (str, os.PathLike)):
        media = os.fspath(obj)
        return {"id": Path(media).stem, "media": media,
                "kind": "image" if is_image_path(media) else "video", "start": None, "end": None}
    get = obj.get if isinstance(obj, dict) else (lambda k, d=None: getattr(obj, k, d))
    media = get("media")
    if media is None or get("id") is None:
        raise XModalError(f"frame extraction: item {obj!r} has no 'id' or 'media'")
    media = os.fspath(media)
    kind = get("kind") or ("image" if is_image_path(media) else "video")
    start, end = get("start"), get("end")
    return {"id": str(get("id")), "media": media, "kind": kind,
            "start": None if start is None else float(start), "end": None if end is None else float(end)}


def _npy_on_disk(path: Path, shape: Tuple[int, ...]) -> np.ndarray:
    """A writable uint8 .npy memory map whose blocks are reserved up front.

    Writing into a sparse memory map on a full disk kills the process (SIGBUS); reserving the
    space first turns that into a one-line WriteError (not an OSError, which decoding would
    blame on the video).
    """
    try:
        array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=tuple(shape))
        with open(path, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, os.path.getsize(path))
        return array
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise WriteError(f"no space left on device while writing {path}; free space or choose another "
                             f"output folder") from None
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None


def _extract_one(job: Dict[str, Any]) -> Dict[str, Any]:
    """Decode one item and write its frames (runs in pool workers): a result dict, never raises MediaError.

    Each picked frame is shrunk as soon as it is decoded, so a long clip never holds more
    than its picks at cache size; the item folder is swapped in whole (atomic_directory).
    """
    began = time.perf_counter()
    media = job["media"]
    source_short: List[int] = []

    def shrink(frame: np.ndarray) -> np.ndarray:
        source_short.append(min(frame.shape[:2]))
        return resize_shorter(frame, job["size"])

    try:
        mtime_ns, size_bytes = source_stat(media)
        with atomic_directory(Path(job["out"]) / job["dir"]) as tmp:
            frames_file = tmp / "frames.npy"

            def on_disk(shape):  # picks are written into a memory-mapped .npy as they are decoded
                return _npy_on_disk(frames_file, shape)

            if job["kind"] == "image":
                decoded = DecodedFrames(frames=shrink(read_image_array(media))[None], timestamps=[0.0],
                                        duration=0.0, grid=1)
            else:
                decoded = decode_frames(media, fps=job["fps"], num_frames=job["num_frames"] or None,
                                        start=job["start"], end=job["end"], convert=shrink, allocate=on_disk)
            decode_seconds = time.perf_counter() - began
            count, height, width = decoded.frames.shape[:3]
            grid, duration = decoded.grid, round(decoded.duration, 6)
            times = [round(t, 6) for t in decoded.timestamps]
            frames, decoded = decoded.frames, None
            if isinstance(frames, np.memmap):
                frames.flush()
                stored_rows = np.load(frames_file, mmap_mode="r").shape[0]
                if stored_rows != count:  # fewer picks than targets (a dropped tail): keep just those
                    np.save(tmp / "kept.npy", np.ascontiguousarray(frames))
                    os.replace(tmp / "kept.npy", frames_file)
            else:  # images, and streams of unknown length (decoded in memory)
                np.save(frames_file, np.ascontiguousarray(frames))
            frames = None  # closes the memory map before the folder is swapped in
            if job["format"] == "jpeg":
                from PIL import Image

                stored = np.load(frames_file, mmap_mode="r")
                for i in range(len(stored)):
                    Image.fromarray(np.asarray(stored[i])).save(tmp / f"{i:03d}.jpg", quality=job["jpeg_quality"])
                del stored
                frames_file.unlink()
    except MediaError as exc:
        return {"id": job["id"], "ok": False, "path": exc.path, "reason": exc.reason,
                "seconds": time.perf_counter() - began}
    except FileNotFoundError as exc:  # the source vanished between listing and decoding
        return {"id": job["id"], "ok": False, "path": media, "reason": f"file does not exist ({exc})",
                "seconds": time.perf_counter() - began}
    entry = {
        "dir": job["dir"], "source": os.path.abspath(media), "kind": job["kind"],
        "mtime_ns": mtime_ns, "size_bytes": size_bytes, "format": job["format"],
        "frames": count, "grid": grid, "timestamps": times, "duration": duration,
        "fps": job["fps"], "num_frames": job["num_frames"],
        "size": job["size"], "start": job["start"], "end": job["end"], "width": width, "height": height,
        "source_short_side": max(source_short) if source_short else None,
        "decode_seconds": round(decode_seconds, 4),
    }
    return {"id": job["id"], "ok": True, "entry": entry, "seconds": time.perf_counter() - began,
            "decode_seconds": decode_seconds}


def _up_to_date(cache: FrameCache, job: Dict[str, Any]) -> bool:
    entry = cache.entry(job["id"])
    if entry is None or not cache.is_fresh(entry):
        return False
    if _source_key(entry["source"]) != _source_key(job["media"]):
        return False
    same = (entry["format"] == job["format"] and entry["size"] == job["size"]
            and entry["num_frames"] == job["num_frames"] and abs(entry["fps"] - job["fps"]) < 1e-9
            and _same(entry["start"], job["start"]) and _same(entry["end"], job["end"]))
    return same and (cache.root / entry["dir"]).is_dir()


def _rate(count: float, seconds: float) -> Optional[float]:
    return round(count / seconds, 3) if seconds > 0 else None


def benchmark_cache(cache: FrameCache, item_ids: List[str], num_frames: int = 12) -> Dict[str, Any]:
    """Time getting the same clips' frames from the cache against decoding them from source.

    Both sides deliver the uint8 frames `load_clip` would get (the later tensor conversion
    and transform cost the same either way, so they are left out of the comparison).
    """
    entries = [cache.items[i] for i in item_ids]

    def budget(entry):  # a cache built with a frame budget serves exactly that budget
        return int(entry["num_frames"] or 0) or num_frames

    def from_cache(entry):
        got = cache.sample(entry["source"], num_frames=budget(entry), fps=entry["fps"],
                           start=entry["start"], end=entry["end"], size=int(entry["size"] or 0) or None)
        if got is None:
            raise MediaError(entry["source"], "cache entry disappeared during the benchmark")
        return got

    def from_source(entry):
        return decode_frames(entry["source"], fps=entry["fps"], num_frames=budget(entry),
                             start=entry["start"], end=entry["end"])

    for entry in entries[:1]:  # warm-up: imports and first-call costs are not throughput
        from_cache(entry)
        from_source(entry)
    timings = {}
    for mode, fn in (("cache", from_cache), ("decode", from_source)):
        frames = 0
        began = time.perf_counter()
        for entry in entries:
            frames += len(fn(entry))
        timings[mode] = (time.perf_counter() - began, frames)
    (cs, cf), (ds, df) = timings["cache"], timings["decode"]
    return {
        "clips": len(entries), "num_frames": num_frames,
        "cache_clips_per_s": _rate(len(entries), cs), "cache_frames_per_s": _rate(cf, cs),
        "decode_clips_per_s": _rate(len(entries), ds), "decode_frames_per_s": _rate(df, ds),
        "speedup": round(ds / cs, 3) if cs > 0 else None,
    }


def _clip_time_stats(times: Dict[str, float]) -> Dict[str, Any]:
    if not times:
        return {}
    values = np.array(list(times.values()), dtype=float)
    slowest = max(times, key=times.get)
    return {"mean": round(float(values.mean()), 4), "median": round(float(np.median(values)), 4),
            "max": round(float(values.max()), 4), "slowest": slowest}


def extract_frames(items: Iterable[Any], out: str | os.PathLike, *, num_frames: int = 0, fps: float = 1.0,
                   fmt: str = DEFAULT_FORMAT, size: int = 224, workers: int = 1, strict: bool = False,
                   progress: bool = True, bench_clips: int = 8, bench_num_frames: int = 12,
                   jpeg_quality: int = JPEG_QUALITY, echo: Optional[Callable[[str], None]] = None
                   ) -> Dict[str, Any]:
    """Decode every item once into the cache at `out`; returns (and saves) the run summary.

    Items are Item-like objects (`.id`, `.media`, `.kind`, `.start`, `.end`), dicts with those
    keys, or plain file paths (id = file stem). Items already cached with the same settings
    and an unchanged source are skipped, so an interrupted run resumes. Unreadable media are
    skipped and listed in `summary["failures"]` (path -> reason, once each); `strict`: the first
    one raises MediaError, after saving the index. `size` must be the model's input size for
    the cache to be lossless (0 keeps the original resolution). No items at all is an error.
    """
    if fmt not in FORMATS:
        raise XModalError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        fps = check_fps(fps)
    except XModalError:
        raise XModalError(f"--fps: expected a positive number, got {fps}") from None
    if size < 0 or num_frames < 0:
        raise XModalError("--size and --num-frames: expected non-negative integers")
    echo = echo or (lambda msg: None)
    root = ensure_dir(out)
    cache = FrameCache(root, create=True)

    jobs, seen, duplicates, up_to_date = [], set(), 0, 0
    for obj in items:
        desc = _item_fields(obj)
        if desc["id"] in seen:
            duplicates += 1
            continue
        seen.add(desc["id"])
        old = cache.entry(desc["id"])
        job = dict(desc, out=str(root), dir=old["dir"] if old else item_dirname(desc["id"]), fps=float(fps),
                   num_frames=int(num_frames), format=fmt, size=int(size), jpeg_quality=int(jpeg_quality))
        if _up_to_date(cache, job):
            up_to_date += 1
        else:
            jobs.append(job)
    if not seen:
        raise XModalError(f"extract-frames: no items to extract into {root} (the split matched no media)")
    echo(f"{len(seen)} items: {up_to_date} already cached, {len(jobs)} to decode into {root}")
    if fmt not in LOSSLESS_FORMATS:
        echo(f"note: --format {fmt} is lossy: evaluations from this cache differ from decoding")

    from xmodal.process_map import process_map
    from xmodal.progress import progress as progress_bar

    extracted = frames_written = 0
    decode_seconds = 0.0
    failures: Dict[str, str] = {}
    failed = 0
    clip_seconds: Dict[str, float] = {}
    began = last_save = time.perf_counter()
    bar = progress_bar(len(jobs), desc="extract-frames", unit="clip", enabled=bool(progress))
    try:
        for result in process_map(_extract_one, jobs, workers, ordered=False):
            bar.update(1)
            decode_seconds += result["seconds"]
            if result["ok"]:
                cache.put(result["id"], result["entry"])
                extracted += 1
                frames_written += result["entry"]["frames"]
                clip_seconds[result["id"]] = round(result["decode_seconds"], 4)
            else:
                failed += 1
                failures.setdefault(result["path"], result["reason"])
                if strict:
                    raise MediaError(result["path"], result["reason"])
            elapsed = time.perf_counter() - began
            bar.set_postfix(clips_s=f"{extracted / max(elapsed, 1e-9):.2f}",
                            frames_s=f"{frames_written / max(elapsed, 1e-9):.1f}", failed=failed)
            if time.perf_counter() - last_save > _SAVE_EVERY_S:
                cache.save()
                last_save = time.perf_counter()
    finally:
        bar.close()
        cache.save()
    wall = time.perf_counter() - began

    summary: Dict[str, Any] = {
        "out": str(root), "format": fmt, "lossless": fmt in LOSSLESS_FORMATS, "fps": fps,
        "num_frames": num_frames, "size": size,
        "workers": workers, "items": len(seen), "duplicates": duplicates, "already_cached": up_to_date,
        "extracted": extracted, "failed": failed, "frames_written": frames_written,
        "wall_seconds": round(wall, 3), "decode_seconds": round(decode_seconds, 3),
        "decode_clips_per_s": _rate(extracted, wall), "decode_frames_per_s": _rate(frames_written, wall),
        "clip_decode_seconds": _clip_time_stats(clip_seconds), "clip_seconds": clip_seconds,
        "failures": failures,
    }
    echo(f"decoded {extracted} clips ({frames_written} frames) in {wall:.2f}s: "
         f"{summary['decode_clips_per_s']} clips/s, {summary['decode_frames_per_s']} frames/s; "
         f"{failed} failed")
    stats = summary["clip_decode_seconds"]
    if stats:
        echo(f"decode time per clip: mean {stats['mean']:.3f}s, median {stats['median']:.3f}s, "
             f"max {stats['max']:.3f}s ({stats['slowest']})")

    bench_ids = [i for i in seen if i in cache.items and cache.items[i]["kind"] == "video"][:max(0, bench_clips)]
    if bench_ids:
        bench = benchmark_cache(cache, bench_ids, num_frames=bench_num_frames)
        summary["read_benchmark"] = bench
        echo(f"reading {bench['clips']} clips x {bench_num_frames} frames: cache "
             f"{bench['cache_clips_per_s']} clips/s ({bench['cache_frames_per_s']} frames/s) vs decoding "
             f"{bench['decode_clips_per_s']} clips/s ({bench['decode_frames_per_s']} frames/s), "
             f"{bench['speedup']}x")
    atomic_write_json(root / SUMMARY_NAME, summary, indent=1)
    return summary
