"""Decoding videos and images into CLIP-ready frames (PyAV + Pillow).

Sampling rule (the one every loader and the frame cache share): a video, or its segment
[start, end), is first sampled on a grid of `fps` frames per second — targets
t_k = start + k / fps for every k with t_k < end (at least one target; `end` defaults to the
declared duration: the video stream's, else the container's) — taking for each target the
frame whose presentation time is nearest (a tie goes to the earlier frame). This is
CLIP4Clip's "1 frame per second" extraction. When the grid has more than `num_frames`
targets, `num_frames` of them are kept uniformly: indices round(linspace(0, len - 1, N)).
When it has fewer, all are kept and `load_clip` pads with zero frames whose mask is False.
Times are measured from the start of the video stream (its first presentation time is 0).

Only the picked frames are decoded as far as needed: between distant targets the decoder
seeks to the keyframe at or before the next target (from the container's keyframe index)
and decodes forward, so picking 12 frames of a 2-hour file touches a few GOPs, not the file.
The frames are exactly those of a front-to-back decode (`seek=False`), bit for bit; a stream
without timestamps or an unusable seek falls back to decoding front to back.

Frames are shown as players show them: a video's display matrix (rotation) and a JPEG's EXIF
orientation are applied; 16-bit greyscale images are scaled to 8 bits, not clipped.

Corrupt input (missing, empty, truncated or undecodable files, JPEGs whose scan data the
decoder reports as corrupt, frames FFmpeg flags as corrupt) raises `MediaError` naming the
path, never a native error or a hang: opening uses PyAV's I/O timeout, decoding is bounded
both in wall time and in the number of frames, and FFmpeg/OS errors are converted.
Truncation is judged the same way for every container: frames that stop more than one
sampling step before the duration the video stream declares (MP4 header, Matroska/WebM
DURATION tag; else the container's, when every stream ends early) mean a truncated file.
`MediaPolicy` decides what a loader does with a `MediaError`: skip and count (default) or
re-raise (strict). A non-positive `fps` is a configuration error (`InvalidFpsError`), raised
before any file is touched, so it is never blamed on the videos.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from xmodal.errors import DataError, XModalError

log = logging.getLogger("xmodal.media")

# CLIP's normalisation constants (the values OpenAI published with CLIP).
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"})

OPEN_TIMEOUT_S = 10.0  # PyAV: seconds to wait for data when opening / reading
DECODE_TIMEOUT_S = 120.0  # wall-clock budget for decoding one clip
NO_INDEX_SEEK_S = 8.0  # without a keyframe index, seek when the next pick is this much further on
MAX_BAD_PACKETS = 16  # packets the decoder may reject before the file counts as corrupt
_TIE_EPS = 1e-9


class MediaError(DataError):
    """A media file could not be read; `.path` and `.reason` say which and why."""

    def __init__(self, path: str, reason: str):
        self.path = str(path)
        self.reason = str(reason)
        super().__init__(f"cannot read media file {self.path}: {self.reason}")

    def __reduce__(self):  # keep it picklable across DataLoader / pool workers
        return (type(self), (self.path, self.reason))


@dataclass
class DecodedFrames:
    """Frames picked from one video (or image): RGB uint8 (N, H, W, 3), their times, the duration."""

    frames: np.ndarray
    timestamps: List[float]
    duration: float
    grid: int = 0  # targets on the 1/fps grid before uniform subsampling (whether these are all of them)
    decoded: int = 0  # frames the decoder produced to find these (work done, for benchmarks/tests)
    seeks: int = 0

    def __len__(self) -> int:
        return len(self.timestamps)


# --------------------------------------------------------------------------- sampling
def sample_targets(start: float, end: float, fps: float) -> List[float]:
    """The 1/fps grid over [start, end): start + k/fps while < end, at least one point."""
    fps = check_fps(fps)
    count = max(1, int(math.ceil((end - start) * fps - 1e-9)))
    return [start + k / fps for k in range(count)]


def uniform_indices(total: int, num: Optional[int]) -> List[int]:
    """`num` indices spread uniformly over range(total) (all of them when total <= num)."""
    if not num or total <= num:
        return list(range(total))
    return [int(i) for i in np.round(np.linspace(0, total - 1, num)).astype(int)]


def is_image_path(path: str) -> bool:
    return os.path.splitext(str(path))[1].lower() in IMAGE_EXTENSIONS


# --------------------------------------------------------------------------- videos
class InvalidFpsError(XModalError, ValueError):
    """`fps` is not a positive number: a configuration error, not a property of any video."""


def check_fps(fps: Any) -> float:
    """`fps` as a float > 0; InvalidFpsError naming `data.fps` otherwise (checked before any file)."""
    try:
        value = float(fps)
    except (TypeError, ValueError):
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise InvalidFpsError(f"data.fps: expected a positive number of frames per second, got {fps!r}")
    return value


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise MediaError(path, "file does not exist")
    if os.path.isdir(path):
        raise MediaError(path, "is a directory, expected a media file")
    if os.path.getsize(path) == 0:
        raise MediaError(path, "file is empty (0 bytes)")


def _declared_duration(stream, container) -> Tuple[Optional[float], bool]:
    """(duration in seconds, whether it comes from the stream header itself)."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base), True
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000.0, False  # AV_TIME_BASE units
    return None, False


_TAG_DURATION = re.compile(r"^\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)\s*$")


def _tag_duration(stream) -> Optional[float]:
    """The per-track DURATION tag Matroska/WebM muxers write ("HH:MM:SS.nnnnnnnnn"), in seconds."""
    metadata = stream.metadata or {}
    text = metadata.get("DURATION") or metadata.get("duration")
    match = _TAG_DURATION.match(str(text)) if text else None
    if match is None:
        return None
    h, m, s = match.groups()
    value = int(h) * 3600 + int(m) * 60 + float(s)
    return value if value > 0 else None


def _video_end(stream, container, duration: Optional[float], trusted: bool) -> Optional[float]:
    """Where the VIDEO stream's own header says its frames end (None: only the container knows).

    The stream's duration (MP4 & co.) or the track's DURATION tag (Matroska/WebM); a container
    duration counts only when the video is its only stream (else audio may legitimately be longer).
    """
    if trusted:
        return duration
    tagged = _tag_duration(stream)
    if tagged is not None:
        return tagged
    if duration is not None and len(container.streams) == 1:
        return duration
    return None


def _frame_rate(stream) -> float:
    for rate in (stream.average_rate, getattr(stream, "guessed_rate", None), stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return 25.0


def _rgb(frame, convert: Optional[Callable[[np.ndarray], np.ndarray]]) -> np.ndarray:
    """A decoded frame as RGB uint8 (H, W, 3), turned upright by its display matrix (as players do)."""
    array = frame.to_ndarray(format="rgb24")
    try:
        rotation = frame.rotation  # counter-clockwise degrees of the DISPLAYMATRIX side data
    except (AttributeError, ValueError):
        rotation = 0
    quarter = int(round(float(rotation or 0) / 90.0)) % 4
    if quarter:
        array = np.ascontiguousarray(np.rot90(array, quarter))
    return convert(array) if convert is not None else array


class _Picks:
    """(time, RGB) picks written straight into one preallocated array: no second copy at the end."""

    def __init__(self, capacity: int, allocate: Optional[Callable[[Tuple[int, ...]], np.ndarray]] = None):
        self.capacity = capacity
        self.allocate = allocate
        self.times: List[float] = []
        self.out: Optional[np.ndarray] = None

    def append(self, pick: Tuple[float, np.ndarray]) -> None:
        t, array = pick
        if self.out is None:
            shape = (self.capacity,) + array.shape
            self.out = self.allocate(shape) if self.allocate is not None else np.empty(shape, array.dtype)
        elif array.shape != self.out.shape[1:]:
            raise ValueError(f"frame size changes mid-stream ({self.out.shape[1:]} then {array.shape})")
        self.out[len(self.times)] = array
        self.times.append(float(t))

    def __len__(self) -> int:
        return len(self.times)

    def frames(self) -> np.ndarray:
        if self.out is None:
            return np.zeros((0, 0, 0, 3), np.uint8)
        return self.out if len(self.times) == self.capacity else self.out[: len(self.times)]


class _Unseekable(Exception):
    """Seeking is not usable for this file: decode it front to back instead."""


class _Frames:
    """Decoding of one video stream in runs: each run starts at a seek (or at the stream start).

    Keeps a global frame budget and deadline, tolerates a few bad packets per file, and learns
    keyframe spacing from the container index (or from decoding) to decide when seeking pays.
    """

    def __init__(self, container, stream, path: str, origin: float, rate: float, max_frames: int,
                 deadline: float, allow_seek: bool):
        self.container, self.stream, self.path = container, stream, path
        self.origin, self.rate = origin, rate
        self.max_frames, self.deadline = max_frames, deadline
        self.allow_seek = allow_seek
        self.count = 0
        self.bad = 0
        self.seeks = 0
        self.started = False  # a run has been started (the first one may start without seeking)
        self._keyframes: Optional[List[float]] = None
        self._index_loaded = False  # the container has a keyframe index (seeking to the start is exact)
        self.backward_landings = 0  # seeks that landed at or before where decoding already was
        self._gop = 0.0  # largest keyframe spacing seen while decoding
        self._last_key: Optional[float] = None

    # ------------------------------------------------------------- decoding one run
    def _decode(self, from_start: bool) -> Iterator[Tuple[float, Any]]:
        """(time since stream start, frame) in presentation order from the current position."""
        import av

        index = 0
        for packet in self.container.demux(self.stream):
            try:
                frames = packet.decode()
            except (av.error.InvalidDataError, av.error.UndefinedError) as exc:
                self.bad += 1
                if self.bad > MAX_BAD_PACKETS:
                    raise MediaError(self.path, f"too many undecodable packets ({exc})") from None
                continue
            for frame in frames:
                if frame.time is not None:
                    t = frame.time - self.origin
                elif from_start:  # streams without timestamps (raw elementary streams)
                    t = index / self.rate
                else:
                    raise _Unseekable()
                index += 1
                self.count += 1
                if self.count > self.max_frames:
                    raise MediaError(self.path, f"decoding did not finish within {self.max_frames} frames")
                if time.monotonic() > self.deadline:
                    raise MediaError(self.path, "decoding timed out")
                if frame.key_frame:
                    if self._last_key is not None and t > self._last_key:
                        self._gop = max(self._gop, t - self._last_key)
                    self._last_key = t
                yield t, frame

    def _probe(self, at: float, from_start: bool):
        """Seek to the keyframe at or before `at` (or the start); (frames, first frame) or None at EOF."""
        import av

        self._last_key = None
        if from_start and not self.started:
            self.started = True
            frames = self._decode(from_start=True)
            first = next(frames, None)
            return None if first is None else (frames, first)
        if not self.allow_seek or (from_start and not self._index_loaded):
            # back to the start after decoding has begun: a timestamp search (MPEG-TS & co.) may land
            # on a later keyframe, so only an indexed container is trusted to get there; else decode
            # the file front to back from a fresh open
            raise _Unseekable()
        self.started = True
        tb = self.stream.time_base
        if tb is None:
            raise _Unseekable()
        if from_start:
            pts = self.stream.start_time if self.stream.start_time is not None else 0
        else:
            pts = int(math.floor((at + self.origin) / tb))
        try:
            self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
        except (av.error.FFmpegError, OSError) as exc:
            raise _Unseekable() from exc
        self.seeks += 1
        frames = self._decode(from_start=from_start)
        for cur in frames:
            if from_start or cur[1].key_frame:  # frames before the first keyframe may be incomplete
                return frames, cur
        return None

    def start_run(self, target: float):
        """(frames, first) with first at or before `target` (or the stream's first frame); None: no data from there on.

        A seek lands on the keyframe at or before the target; if the container index put it
        after the target, or the file holds no data there, earlier positions are tried.
        """
        back = 0.0
        while True:
            at = target - back
            from_start = at <= 0.0 or not self.allow_seek
            got = self._probe(max(at, 0.0), from_start)
            if got is None:
                return None if from_start else self._last_data_before(target, at)
            frames, first = got
            if from_start or first[0] <= target + _TIE_EPS:
                return frames, first
            back = 2 * back + (first[0] - target) + 0.5

    def _last_data_before(self, target: float, empty_at: float):
        """The file holds no frame at/after `empty_at` (truncated, or the video ends early):
        bisect for a run that reaches the last frames instead of decoding from far back."""
        lo, hi, step = None, empty_at, 1.0
        while lo is None:
            at = empty_at - step
            if at <= 0.0:
                got = self._probe(0.0, True)
                if got is None:
                    return None
                lo = 0.0
                break
            if self._probe(at, False) is not None:
                lo = at
            else:
                hi, step = at, step * 2
        while hi - lo > max(2.0, 4.0 / self.rate):
            mid = (lo + hi) / 2
            if self._probe(mid, False) is not None:
                lo = mid
            else:
                hi = mid
        return self._probe(lo, lo <= 0.0)

    def load_index(self) -> None:
        """Matroska/WebM read their keyframe index (cues) on the first seek: do it up front."""
        import av

        self._index_loaded = len(self.keyframes()) >= 2
        if not self.allow_seek or self._index_loaded or self.stream.time_base is None:
            return
        if "matroska" not in (getattr(self.container.format, "name", "") or ""):
            return
        start = self.stream.start_time if self.stream.start_time is not None else 0
        try:
            self.container.seek(start, stream=self.stream, backward=True, any_frame=False)
        except (av.error.FFmpegError, OSError):
            return
        self.started = True  # the first run now seeks back to the start as well
        self._keyframes = None
        self._index_loaded = len(self.keyframes()) >= 2
        if not self._index_loaded:
            raise _Unseekable()  # decoding began at a seek that cannot be trusted: start afresh

    # ------------------------------------------------------------- seek or decode on?
    def keyframes(self) -> List[float]:
        """Keyframe times from the container index (empty when it has fewer than two)."""
        if self._keyframes is None:
            times: List[float] = []
            try:
                tb = float(self.stream.time_base)
                times = sorted(e.timestamp * tb - self.origin for e in self.stream.index_entries
                               if e.is_keyframe)
            except (AttributeError, TypeError, ValueError):
                times = []
            if times and times[0] < 0:  # index times are decode times: shift by the reorder delay
                times = [t - times[0] for t in times]
            self._keyframes = times if len(times) >= 2 else []
        return self._keyframes

    def worth_seeking(self, target: float, position: float) -> bool:
        """Seek when a keyframe lies between the decoding position and the target (per the index),
        or, without an index, when the target is well past the position."""
        if not self.allow_seek:
            return False
        slack = max(4.0 / self.rate, 0.25)
        keys = self.keyframes() if self.backward_landings < 2 else []  # an index that misleads is ignored
        if keys:
            i = bisect.bisect_right(keys, target + _TIE_EPS) - 1
            return i >= 0 and keys[i] > position + slack
        return target - position > max(NO_INDEX_SEEK_S, 2.0 * self._gop)


def _pick_targets(decoder: _Frames, targets: List[float], convert,
                  allocate=None) -> Tuple[_Picks, Optional[Tuple[float, Any]], int]:
    """Nearest frame (a tie goes to the earlier one) for each sorted target; seeks between distant targets.

    Returns (the picks, the last decoded frame when the stream ended, index of the first target
    left unassigned at the end of the stream).
    """
    picked = _Picks(len(targets), allocate)
    cache: Tuple[Any, Optional[np.ndarray]] = (None, None)

    def take(entry):
        nonlocal cache
        if cache[0] is not entry[1]:
            if getattr(entry[1], "is_corrupt", False):
                raise MediaError(decoder.path, f"the decoder reported corrupt data in the frame at {entry[0]:.2f}s")
            cache = (entry[1], _rgb(entry[1], convert))
        picked.append((entry[0], cache[1]))

    i, n = 0, len(targets)
    frames = None
    prev = None
    sought = -1  # the target that started the current run: each target causes at most one seek
    while i < n:
        if frames is None or (i > sought and decoder.worth_seeking(targets[i], prev[0])):
            run = decoder.start_run(targets[i])
            sought = i
            if run is None:
                return picked, prev, i
            if prev is not None and run[1][0] <= prev[0]:
                decoder.backward_landings += 1
            frames, first = run
            prev = None
            stream = itertools.chain([first], frames)
        else:
            stream = frames
        ended = True
        for cur in stream:
            while i < n and targets[i] <= cur[0]:
                t = targets[i]
                near_prev = prev is not None and (t - prev[0]) <= (cur[0] - t) + _TIE_EPS
                take(prev if near_prev else cur)
                i += 1
            prev = cur
            if i >= n or (i > sought and decoder.worth_seeking(targets[i], cur[0])):
                ended = False
                break
        if ended:
            return picked, prev, i
    return picked, None, n


def _streams_end(container, near: float, origin: float) -> Optional[float]:
    """Latest packet end (s since the video start) over ALL streams, read from `near` on."""
    import av

    try:
        container.seek(max(0, int((near + origin - 2.0) * 1_000_000)), backward=True)
        end = None
        for packet in container.demux():
            if packet.pts is None or packet.time_base is None:
                continue
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base) - origin
            end = t if end is None else max(end, t)
        return end
    except (av.error.FFmpegError, OSError):
        return None


def _serve_tail(targets: List[float], i: int, last, picked, path: str, fps: float, rate: float,
                duration: Optional[float], video_end: Optional[float], container, origin: float, convert) -> None:
    """Targets left when the stream ended: the last frame serves those close to it.

    A target further than one sampling step past the last frame means the file ends early: when
    the video stream's own header (duration, or Matroska's DURATION tag) says it goes on, or every
    stream of the container stops early too, the file is truncated (MediaError); otherwise the
    video legitimately ends before the container (e.g. longer audio) and the tail is dropped.
    """
    last_time = last[0]
    tolerance = max(1.0, 1.0 / fps) + 1.0 / rate
    converted = None
    for target in targets[i:]:
        if target - last_time > tolerance:
            if video_end is not None:
                declared = video_end
            else:
                ends = _streams_end(container, last_time, origin)
                every_stream_short = ends is not None and duration is not None and ends < duration - tolerance
                declared = duration if every_stream_short else None
            if declared is not None and declared - last_time > tolerance:
                raise MediaError(path, f"truncated: frames stop at {last_time:.2f}s but the file declares "
                                       f"{declared:.2f}s")
            return
        if converted is None:
            if getattr(last[1], "is_corrupt", False):
                raise MediaError(path, f"the decoder reported corrupt data in the frame at {last_time:.2f}s")
            converted = _rgb(last[1], convert)
        picked.append((last_time, converted))


class _Picker:
    """Nearest-frame matching on the lazy 1/fps grid of a stream of unknown length (decoded front to back)."""

    def __init__(self, start: float, end: Optional[float], fps: float, convert):
        self.start, self.end, self.fps = start, end, fps
        self.k = 0
        self.picked: List[Tuple[float, np.ndarray]] = []
        self.convert = convert
        self._converted: Tuple[Any, Optional[np.ndarray]] = (None, None)

    def next_target(self) -> Optional[float]:
        t = self.start + self.k / self.fps
        if self.end is not None and t >= self.end and self.k > 0:
            return None
        return t

    def array(self, frame) -> np.ndarray:
        if self._converted[0] is not frame:
            self._converted = (frame, _rgb(frame, self.convert))
        return self._converted[1]

    def offer(self, prev, cur) -> bool:
        ctime, cframe = cur
        target = self.next_target()
        while target is not None and target <= ctime:
            chosen = prev if prev is not None and (target - prev[0]) <= (ctime - target) + _TIE_EPS else cur
            self.picked.append((chosen[0], self.array(chosen[1])))
            self.k += 1
            target = self.next_target()
        return target is not None

    def finish(self, last, rate: float) -> None:
        """On an unknown-length stream the grid stops at the end of the last frame."""
        while True:
            target = self.next_target()
            if target is None or target >= last[0] + 1.0 / rate:
                return
            self.picked.append((last[0], self.array(last[1])))
            self.k += 1


def _open(path: str):
    import av

    return av.open(path, timeout=(OPEN_TIMEOUT_S, OPEN_TIMEOUT_S))


def _stream_facts(container):
    if not container.streams.video:
        return None
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    origin = float(stream.start_time * stream.time_base) if (
        stream.start_time is not None and stream.time_base is not None) else 0.0
    return stream, _frame_rate(stream), origin


def _decode_video(path: str, fps: float, num_frames: Optional[int], start: Optional[float],
                  end: Optional[float], timeout: float, convert=None, seek: bool = True,
                  allocate=None) -> DecodedFrames:
    deadline = time.monotonic() + timeout
    with _open(path) as container:
        facts = _stream_facts(container)
        if facts is None:
            raise MediaError(path, "no video stream in the file")
        stream, rate, origin = facts
        duration, trusted = _declared_duration(stream, container)

        s = max(0.0, float(start)) if start is not None else 0.0
        if duration is None:  # unknown length: walk the whole grid front to back, subsample afterwards
            return _decode_unknown_length(container, stream, path, origin, rate, fps, num_frames, s,
                                          None if end is None else float(end), deadline, convert)
        s = min(s, max(0.0, duration - 1.0 / rate))
        e = duration if end is None else min(float(end), duration)
        e = max(e, s)
        grid = sample_targets(s, e, fps)
        grid_size = len(grid)
        targets = [grid[i] for i in uniform_indices(len(grid), num_frames)]
        max_frames = int((e + 10.0) * max(rate, 1.0) * 4) + 1000  # what a sane stream this long could hold
        video_end = _video_end(stream, container, duration, trusted)

        decoder = _Frames(container, stream, path, origin, rate, max_frames, deadline, allow_seek=seek)
        try:
            if len(targets) > 1 or targets[0] > 0:
                decoder.load_index()
            picked, last, left = _pick_targets(decoder, targets, convert, allocate)
        except _Unseekable:
            if not seek:
                raise
            return _decode_video(path, fps, num_frames, start, end, max(0.0, deadline - time.monotonic()),
                                 convert, seek=False, allocate=allocate)
        if not picked and last is None:
            raise MediaError(path, "no decodable video frame")
        if left < len(targets):
            if last is None:  # nothing decodable at or after the segment: its nearest frame is the last
                raise MediaError(path, "no decodable video frame")
            _serve_tail(targets, left, last, picked, path, fps, rate, duration, video_end, container,
                        origin, convert)
        if not picked:  # the segment lies past the last frame: its nearest frame is the last
            picked.append((last[0], _rgb(last[1], convert)))
    return DecodedFrames(frames=picked.frames(), timestamps=picked.times, duration=float(duration),
                         grid=grid_size, decoded=decoder.count, seeks=decoder.seeks)


def _decode_unknown_length(container, stream, path, origin, rate, fps, num_frames, s, e, deadline, convert):
    picker = _Picker(s, e, fps, convert)
    decoder = _Frames(container, stream, path, origin, rate, 5_000_000, deadline, allow_seek=False)
    prev = None
    reached_end = True
    for cur in decoder._decode(from_start=True):
        if not picker.offer(prev, cur):
            reached_end = False
            break
        prev = cur
    if prev is None and not picker.picked:
        raise MediaError(path, "no decodable video frame")
    if reached_end and prev is not None:
        picker.finish(prev, rate)
    if not picker.picked:  # the segment lies past the last frame: its nearest frame is the last
        picker.picked.append((prev[0], picker.array(prev[1])))
    picked = picker.picked
    duration = (prev[0] if prev is not None else picked[-1][0]) + 1.0 / rate
    grid_size = len(picked)
    picked = [picked[i] for i in uniform_indices(len(picked), num_frames)]
    return _frames_result(picked, duration, decoder, grid_size)


def _frames_result(picked, duration: float, decoder: _Frames, grid_size: int) -> DecodedFrames:
    frames = np.stack([a for _, a in picked]) if picked else np.zeros((0, 0, 0, 3), np.uint8)
    return DecodedFrames(frames=frames, timestamps=[float(t) for t, _ in picked], duration=float(duration),
                         grid=grid_size, decoded=decoder.count, seeks=decoder.seeks)


def decode_frames(path: str, fps: float = 1.0, num_frames: Optional[int] = 12,
                  start: Optional[float] = None, end: Optional[float] = None, *,
                  timeout: float = DECODE_TIMEOUT_S, convert: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                  seek: bool = True, allocate: Optional[Callable[[Tuple[int, ...]], np.ndarray]] = None
                  ) -> DecodedFrames:
    """Decode the frames of `path` picked by the module's sampling rule (num_frames None/0: all).

    Only the picked frames are converted and kept (`convert`, e.g. a resize, is applied to each
    as it is picked, so a long clip never holds more than its picks). `allocate(shape)` may
    supply the uint8 output array (e.g. a memory-mapped .npy, so thousands of picks go to disk
    rather than RAM); `frames` may then be a leading slice of it. Distant picks are reached by
    seeking to the keyframe before them (`seek=False`: decode front to back; same frames).
    Images decode to one frame at time 0. Raises MediaError for anything unreadable.
    """
    fps = check_fps(fps)
    path = str(path)
    _check_file(path)
    if is_image_path(path):
        array = read_image_array(path)
        if convert is not None:
            array = convert(array)
        return DecodedFrames(frames=array[None], timestamps=[0.0], duration=0.0, grid=1)
    import av

    try:
        return _decode_video(path, fps, num_frames, start, end, timeout, convert, seek, allocate)
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, MemoryError, RuntimeError) as exc:
        raise MediaError(path, f"undecodable video ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- images
_HIGH_BIT_DEPTH_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def _image_rgb8(img, path: str) -> np.ndarray:
    """RGB uint8 of a PIL image; 16-bit greyscale is scaled to 8 bits (Pillow's convert would clip it)."""
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        values = np.asarray(img).astype(np.int64)
        top = _HIGH_BIT_DEPTH_MODES[img.mode]
        if values.size and (values.min() < 0 or values.max() > top):
            raise MediaError(path, f"{img.mode} image with values outside 0..{top}; expected 8 or 16 bits")
        grey = ((values * 255 + top // 2) // top).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        raise MediaError(path, "floating-point image; expected 8- or 16-bit integer pixels")
    return np.array(img.convert("RGB"))


def _jpeg_corruption(path: str) -> Optional[str]:
    """What FFmpeg's JPEG decoder reports about the entropy-coded data (Pillow stays silent), or None."""
    import av

    level = av.logging.get_level()
    messages: List[str] = []
    corrupt = False
    try:
        av.logging.set_level(av.logging.ERROR)
        with av.logging.Capture(True) as logs:
            with av.open(path, format="image2") as container:
                stream = container.streams.video[0]
                stream.thread_type = "NONE"
                for frame in container.decode(stream):
                    corrupt = corrupt or bool(frame.is_corrupt)
        messages = [str(m[2]).strip() for m in logs if m[0] <= av.logging.ERROR]
    except (av.error.FFmpegError, OSError, IndexError):
        return None  # a JPEG variant FFmpeg cannot read (Pillow could): no evidence either way
    finally:
        av.logging.set_level(level)
    messages = [m for m in messages if m and "support" not in m.lower()]
    if messages:
        return "corrupt JPEG data (decoder: " + "; ".join(dict.fromkeys(messages[:3])) + ")"
    return "corrupt JPEG data (the decoder flagged the frame)" if corrupt else None


def read_image_array(path: str) -> np.ndarray:
    """An image file as upright RGB uint8 (H, W, 3); MediaError when missing, undecodable or corrupt.

    EXIF orientation is applied (as viewers do), 16-bit greyscale is scaled, and JPEG scan data
    is checked for corruption that Pillow would silently decode as garbage.
    """
    from PIL import Image, ImageOps

    path = str(path)
    _check_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            fmt = img.format
            upright = ImageOps.exif_transpose(img)
            array = _image_rgb8(upright if upright is not None else img, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MediaError(path, f"undecodable image ({type(exc).__name__}: {exc})") from None
    if fmt == "JPEG":
        problem = _jpeg_corruption(path)
        if problem:
            raise MediaError(path, problem)
    return array


def _to_tensor(frame: np.ndarray, transform: Optional[Callable]):
    import torch
    from PIL import Image

    if transform is None:
        return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().div_(255.0)
    out = transform(Image.fromarray(frame))
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise TypeError(f"transform must return a (3, H, W) tensor, got {type(out).__name__}")
    return out


def transform_size(transform: Optional[Callable]) -> Optional[int]:
    """The input size a transform resizes to (ClipTransform, or a torchvision Compose with a Resize).

    None without a transform; -1 when it cannot be told (a frame cache then serves only frames
    stored at their original size).
    """
    if transform is None:
        return None
    size = getattr(transform, "image_size", None)
    if isinstance(size, int):
        return size
    for step in getattr(transform, "transforms", []) or []:
        if type(step).__name__ == "Resize":
            value = step.size
            if isinstance(value, int):
                return value
            if isinstance(value, (list, tuple)) and len(value) == 1:
                return int(value[0])
            return -1
    return -1


def load_image(path: str, transform: Optional[Callable] = None, cache=None):
    """One image as a (3, H, W) float tensor (transform applied to the PIL image; else [0, 1])."""
    frame = None
    if cache is not None:
        cached = cache.sample(str(path), num_frames=1, size=transform_size(transform))
        if cached is not None and len(cached):
            frame = cached.frames[0]
    if frame is None:
        frame = read_image_array(str(path))
    return _to_tensor(frame, transform)


def load_clip(path: str, num_frames: int = 12, fps: float = 1.0, transform: Optional[Callable] = None,
              start: Optional[float] = None, end: Optional[float] = None, cache=None, *,
              return_times: bool = False):
    """Frames of a video (or an image) as ((F, 3, H, W) float, (F,) bool mask), F = num_frames.

    Real frames come first and are True in the mask; the rest are zeros. The transform gets
    PIL images (e.g. `clip_transform(224)` or a backbone's `preprocess_val`); without one,
    frames are RGB in [0, 1]. With a `FrameCache`, cached frames of the same source are used
    (only when they give exactly the pixels decoding would; see FrameCache.sample).
    `return_times=True` adds a third value: the real frames' times in seconds (list of floats).
    """
    import torch

    fps = check_fps(fps)
    path = str(path)
    decoded = None
    if cache is not None:
        decoded = cache.sample(path, num_frames=num_frames, fps=fps, start=start, end=end,
                               size=transform_size(transform))
    if decoded is None:
        decoded = decode_frames(path, fps=fps, num_frames=num_frames, start=start, end=end)
    real = len(decoded)
    total = max(int(num_frames or 0), real)
    if transform is None:  # one conversion for the whole clip
        frames = torch.from_numpy(np.ascontiguousarray(decoded.frames)).permute(0, 3, 1, 2)
        pixels = torch.zeros((total,) + tuple(frames.shape[1:]), dtype=torch.float32)
        pixels[:real] = frames.float().div_(255.0)
    else:
        tensors = [_to_tensor(frame, transform) for frame in decoded.frames]
        shape = tensors[0].shape
        if any(t.shape != shape for t in tensors):
            raise MediaError(path, "transform returned frames of different sizes; expected one fixed size")
        pixels = torch.zeros((total,) + tuple(shape), dtype=tensors[0].dtype)
        pixels[:real] = torch.stack(tensors)
    mask = torch.zeros(total, dtype=torch.bool)
    mask[:real] = True
    if return_times:
        return pixels, mask, [float(t) for t in decoded.timestamps]
    return pixels, mask


# --------------------------------------------------------------------------- transform
class ClipTransform:
    """CLIP evaluation preprocessing for PIL images or RGB uint8 arrays (H, W, 3).

    Delegates to open_clip's own eval transform (resize the shorter side bicubic to
    `image_size`, centre crop, to tensor, normalise) so pixels match OpenCLIP exactly.
    """

    def __init__(self, image_size: int, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                 std: Sequence[float] = OPENAI_DATASET_STD):
        from open_clip import image_transform

        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self._transform = image_transform(self.image_size, is_train=False, mean=self.mean, std=self.std)

    def __call__(self, image):
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise TypeError(f"expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        return self._transform(image)

    def __repr__(self) -> str:
        return f"ClipTransform(image_size={self.image_size}, mean={self.mean}, std={self.std})"


def clip_transform(image_size: int, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                   std: Sequence[float] = OPENAI_DATASET_STD) -> ClipTransform:
    """CLIP preprocessing at `image_size` (see ClipTransform)."""
    return ClipTransform(image_size, mean, std)


# --------------------------------------------------------------------------- policy
@dataclass
class MediaPolicy:
    """What loaders do with unreadable media: skip and count (default) or raise (`strict`).

    Counters are per process: with DataLoader workers each worker holds its own copy.
    Each failing path is logged once, with its reason.
    """

    strict: bool = False
    loaded: int = 0
    skipped: int = 0
    failures: Dict[str, str] = field(default_factory=dict)

    def record(self, error: MediaError) -> None:
        """Count a failure (strict: re-raise it)."""
        if self.strict:
            raise error
        self.skipped += 1
        if error.path not in self.failures:
            self.failures[error.path] = error.reason
            log.warning("skipping unreadable media %s: %s", error.path, error.reason)

    def call(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs), or None when it raised MediaError and the policy skips."""
        try:
            result = fn(*args, **kwargs)
        except MediaError as exc:
            self.record(exc)
            return None
        self.loaded += 1
        return result

    def summary(self) -> Dict[str, Any]:
        return {"strict": self.strict, "loaded": self.loaded, "skipped": self.skipped,
                "failed_files": len(self.failures), "failures": dict(self.failures)}
