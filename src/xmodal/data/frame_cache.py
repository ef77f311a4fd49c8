"""The frame cache: every item decoded once at `fps`, kept as small JPEGs or one .npy.

Layout of a cache directory:
    index.json            {"version": 1, "items": {item id: entry}}, written atomically
    <item dir>/000.jpg..  (format "jpeg") or <item dir>/frames.npy (format "npy", uint8 N,H,W,3)
    extract_summary.json  counts and throughput of the last `extract_frames` run

An entry records the source path with its mtime/size (a changed source makes the entry
stale), the segment, fps, frame count and each frame's timestamp. Frames are the ones
`media.decode_frames` picks (num_frames 0 = the whole 1-fps grid), with the shorter side
reduced to `size` (never enlarged) by the same bicubic resize CLIP's transform uses, so
`clip_transform(size)` of a cached frame equals that of the decoded one (npy: exactly).
`load_clip(..., cache=FrameCache(dir))` finds entries by source path and samples from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from xmodal.data.media import (
    DecodedFrames,
    MediaError,
    MediaPolicy,
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
FORMATS = ("jpeg", "npy")
JPEG_QUALITY = 90
_SAVE_EVERY_S = 10.0  # resumability: the index is rewritten at least this often


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    """Read side of a cache directory: look entries up by item id or source path, read frames."""

    def __init__(self, root: str | os.PathLike, check_source: bool = True):
        self.root = Path(root)
        self.check_source = check_source
        self.items: Dict[str, Dict[str, Any]] = {}
        self._by_source: Dict[str, List[str]] = {}
        self.reload()

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_NAME

    def reload(self) -> None:
        """(Re)read index.json; a missing index is an empty cache."""
        self.items = {}
        if self.index_path.exists():
            try:
                data = json.loads(self.index_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise XModalError(f"{self.index_path}: not a readable JSON frame-cache index ({exc})") from None
            if not isinstance(data, dict) or not isinstance(data.get("items"), dict):
                raise XModalError(f"{self.index_path}: expected an object with an 'items' mapping")
            if data.get("version") != INDEX_VERSION:
                raise XModalError(f"{self.index_path}: index version {data.get('version')!r}, "
                                  f"expected {INDEX_VERSION}")
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
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.index_path, {"version": INDEX_VERSION, "items": self.items})

    def __len__(self) -> int:
        return len(self.items)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.items

    def entry(self, item_id: str) -> Optional[Dict[str, Any]]:
        return self.items.get(item_id)

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
        """A fresh entry of `path` at `fps` whose segment covers [start, end) (exact match first)."""
        best = None
        for item_id in self._by_source.get(_source_key(path), []):
            entry = self.items[item_id]
            if entry["kind"] == "video" and abs(entry["fps"] - fps) > 1e-6:
                continue
            if not self.is_fresh(entry):
                continue
            if _same(entry["start"], start) and _same(entry["end"], end):
                return entry
            lo = entry["start"] or 0.0
            hi = entry["end"] if entry["end"] is not None else math.inf
            if lo <= (start or 0.0) + 1e-6 and hi >= (end if end is not None else math.inf) - 1e-6:
                best = best or entry
        return best

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

    def sample(self, path: str, num_frames: Optional[int] = 12, fps: float = 1.0,
               start: Optional[float] = None, end: Optional[float] = None) -> Optional[DecodedFrames]:
        """The frames `decode_frames` would pick, from the cache; None when not cached (or broken).

        With the entry's own segment this is exactly the decoder's choice; a sub-segment takes
        the cached frames whose time falls in [start - 0.5/fps, end) (at least the nearest one).
        Only the frames picked are read.
        """
        entry = self.find(path, fps=fps, start=start, end=end)
        if entry is None:
            return None
        times = np.asarray(entry["timestamps"], dtype=float)
        keep = np.arange(len(times))
        if not (_same(entry["start"], start) and _same(entry["end"], end)):
            lo = (start or 0.0) - 0.5 / fps
            hi = end if end is not None else math.inf
            keep = np.flatnonzero((times >= lo) & (times < hi))
            if len(keep) == 0:
                middle = ((start or 0.0) + (end if end is not None else entry["duration"])) / 2
                keep = np.array([int(np.argmin(np.abs(times - middle)))])
        keep = keep[uniform_indices(len(keep), num_frames)]
        try:
            return self.read(entry, keep)
        except MediaError as exc:
            log.warning("ignoring broken cache entry for %s: %s", path, exc)
            return None


# --------------------------------------------------------------------------- writing
def _describe(obj: Any) -> Dict[str, Any]:
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


def _extract_one(job: Dict[str, Any]) -> Dict[str, Any]:
    """Decode one item and write its frames (runs in pool workers): a result dict, never raises MediaError."""
    began = time.perf_counter()
    media = job["media"]
    try:
        mtime_ns, size_bytes = source_stat(media)
        if job["kind"] == "image":
            decoded = DecodedFrames(frames=read_image_array(media)[None], timestamps=[0.0], duration=0.0)
        else:
            decoded = decode_frames(media, fps=job["fps"], num_frames=job["num_frames"] or None,
                                    start=job["start"], end=job["end"])
        frames = [resize_shorter(f, job["size"]) for f in decoded.frames]
        root = Path(job["out"])
        tmp = root / f".tmp-{job['dir']}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            if job["format"] == "npy":
                np.save(tmp / "frames.npy", np.stack(frames))
            else:
                from PIL import Image

                for i, frame in enumerate(frames):
                    Image.fromarray(frame).save(tmp / f"{i:03d}.jpg", quality=job["jpeg_quality"])
            final = root / job["dir"]
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except MediaError as exc:
        return {"id": job["id"], "ok": False, "path": exc.path, "reason": exc.reason,
                "seconds": time.perf_counter() - began}
    except FileNotFoundError as exc:  # the source vanished between listing and decoding
        return {"id": job["id"], "ok": False, "path": media, "reason": f"file does not exist ({exc})",
                "seconds": time.perf_counter() - began}
    height, width = frames[0].shape[:2]
    entry = {
        "dir": job["dir"], "source": os.path.abspath(media), "kind": job["kind"],
        "mtime_ns": mtime_ns, "size_bytes": size_bytes, "format": job["format"],
        "frames": len(frames), "timestamps": [round(t, 6) for t in decoded.timestamps],
        "duration": round(decoded.duration, 6), "fps": job["fps"], "num_frames": job["num_frames"],
        "size": job["size"], "start": job["start"], "end": job["end"], "width": width, "height": height,
    }
    return {"id": job["id"], "ok": True, "entry": entry, "seconds": time.perf_counter() - began}


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


def _run_jobs(jobs: List[Dict[str, Any]], workers: int) -> Iterable[Dict[str, Any]]:
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield _extract_one(job)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
        futures = [pool.submit(_extract_one, job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _rate(count: float, seconds: float) -> Optional[float]:
    return round(count / seconds, 3) if seconds > 0 else None


def benchmark_cache(cache: FrameCache, item_ids: List[str], num_frames: int = 12) -> Dict[str, Any]:
    """Time getting the same clips' frames from the cache against decoding them from source.

    Both sides deliver the uint8 frames `load_clip` would get (the later tensor conversion
    and transform cost the same either way, so they are left out of the comparison).
    """
    entries = [cache.items[i] for i in item_ids]

    def from_cache(entry):
        got = cache.sample(entry["source"], num_frames=num_frames, fps=entry["fps"],
                           start=entry["start"], end=entry["end"])
        if got is None:
            raise MediaError(entry["source"], "cache entry disappeared during the benchmark")
        return got

    def from_source(entry):
        return decode_frames(entry["source"], fps=entry["fps"], num_frames=num_frames,
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


def extract_frames(items: Iterable[Any], out: str | os.PathLike, *, num_frames: int = 0, fps: float = 1.0,
                   fmt: str = "jpeg", size: int = 224, workers: int = 1, strict: bool = False,
                   progress: bool = True, bench_clips: int = 8, bench_num_frames: int = 12,
                   jpeg_quality: int = JPEG_QUALITY, echo: Optional[Callable[[str], None]] = None
                   ) -> Dict[str, Any]:
    """Decode every item once into the cache at `out`; returns (and saves) the run summary.

    Items are Item-like objects (`.id`, `.media`, `.kind`, `.start`, `.end`), dicts with those
    keys, or plain file paths (id = file stem). Items already cached with the same settings
    and an unchanged source are skipped, so an interrupted run resumes. Unreadable media are
    skipped and counted (strict: the first one raises MediaError, after saving the index).
    """
    if fmt not in FORMATS:
        raise XModalError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if fps <= 0:
        raise XModalError(f"--fps: expected a positive number, got {fps}")
    if size < 0 or num_frames < 0:
        raise XModalError("--size and --num-frames: expected non-negative integers")
    echo = echo or (lambda msg: None)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    cache = FrameCache(root)
    policy = MediaPolicy(strict=strict)

    jobs, seen, duplicates, up_to_date = [], set(), 0, 0
    for obj in items:
        desc = _describe(obj)
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
    echo(f"{len(seen)} items: {up_to_date} already cached, {len(jobs)} to decode into {root}")

    from tqdm import tqdm

    extracted = frames_written = 0
    decode_seconds = 0.0
    began = last_save = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="clip", desc="extract-frames", disable=not progress)
    try:
        for result in _run_jobs(jobs, workers):
            bar.update(1)
            decode_seconds += result["seconds"]
            if result["ok"]:
                cache.put(result["id"], result["entry"])
                extracted += 1
                frames_written += result["entry"]["frames"]
            else:
                policy.record(MediaError(result["path"], result["reason"]))
            elapsed = time.perf_counter() - began
            bar.set_postfix(clips_s=f"{extracted / max(elapsed, 1e-9):.2f}",
                            frames_s=f"{frames_written / max(elapsed, 1e-9):.1f}", failed=policy.skipped)
            if time.perf_counter() - last_save > _SAVE_EVERY_S:
                cache.save()
                last_save = time.perf_counter()
    finally:
        bar.close()
        cache.save()
    wall = time.perf_counter() - began

    summary: Dict[str, Any] = {
        "out": str(root), "format": fmt, "fps": fps, "num_frames": num_frames, "size": size,
        "workers": workers, "items": len(seen), "duplicates": duplicates, "already_cached": up_to_date,
        "extracted": extracted, "failed": policy.skipped, "frames_written": frames_written,
        "wall_seconds": round(wall, 3), "decode_seconds": round(decode_seconds, 3),
        "decode_clips_per_s": _rate(extracted, wall), "decode_frames_per_s": _rate(frames_written, wall),
        "failures": dict(policy.failures),
    }
    echo(f"decoded {extracted} clips ({frames_written} frames) in {wall:.2f}s: "
         f"{summary['decode_clips_per_s']} clips/s, {summary['decode_frames_per_s']} frames/s; "
         f"{policy.skipped} failed")

    bench_ids = [i for i in seen if i in cache.items and cache.items[i]["kind"] == "video"][:max(0, bench_clips)]
    if bench_ids:
        bench = benchmark_cache(cache, bench_ids, num_frames=bench_num_frames)
        summary["read_benchmark"] = bench
        echo(f"reading {bench['clips']} clips x {bench_num_frames} frames: cache "
             f"{bench['cache_clips_per_s']} clips/s ({bench['cache_frames_per_s']} frames/s) vs decoding "
             f"{bench['decode_clips_per_s']} clips/s ({bench['decode_frames_per_s']} frames/s), "
             f"{bench['speedup']}x")
    write_json_atomic(root / SUMMARY_NAME, summary)
    return summary
