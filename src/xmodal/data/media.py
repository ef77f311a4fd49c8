"""Decoding videos and images into CLIP-ready frames (PyAV + Pillow).

Sampling rule (the one every loader and the frame cache share): a video, or its segment
[start, end), is first sampled on a grid of `fps` frames per second — targets
t_k = start + k / fps for every k with t_k < end (at least one target) — taking for each target
the decoded frame whose presentation time is nearest (a tie goes to the earlier frame). This
is CLIP4Clip's "1 frame per second" extraction. When the grid has more than `num_frames`
targets, `num_frames` of them are kept uniformly: indices round(linspace(0, len - 1, N)).
When it has fewer, all are kept and `load_clip` pads with zero frames whose mask is False.
Times are measured from the start of the video stream (its first presentation time is 0).

Corrupt input (missing, empty, truncated or undecodable files) raises `MediaError`, never a
native error or a hang: opening uses PyAV's I/O timeout, decoding is bounded both in wall
time and in the number of frames, and FFmpeg/OS errors are converted. `MediaPolicy` decides
what a loader does with a `MediaError`: skip and count (default) or re-raise (strict).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from xmodal.errors import DataError

log = logging.getLogger("xmodal.media")

# CLIP's normalisation constants (the values OpenAI published with CLIP).
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"})

OPEN_TIMEOUT_S = 10.0  # PyAV: seconds to wait for data when opening / reading
DECODE_TIMEOUT_S = 120.0  # wall-clock budget for decoding one clip
SEEK_MIN_S = 5.0  # segments starting later than this are reached by seeking
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

    def __len__(self) -> int:
        return len(self.timestamps)


# --------------------------------------------------------------------------- sampling
def sample_targets(start: float, end: float, fps: float) -> List[float]:
    """The 1/fps grid over [start, end): start + k/fps while < end, at least one point."""
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
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


def _frame_rate(stream) -> float:
    for rate in (stream.average_rate, getattr(stream, "guessed_rate", None), stream.base_rate):
        if rate is not None and float(rate) > 0:
            return float(rate)
    return 25.0


def _iter_frames(container, stream, path: str, origin: float, rate: float,
                 max_frames: int, deadline: float) -> Iterator[Tuple[float, Any]]:
    """Yield (time since stream start, frame) in decode order, tolerating a few bad packets."""
    bad = 0
    count = 0
    import av

    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except (av.error.InvalidDataError, av.error.UndefinedError) as exc:
            bad += 1
            if bad > MAX_BAD_PACKETS:
                raise MediaError(path, f"too many undecodable packets ({exc})") from None
            continue
        for frame in frames:
            if frame.time is not None:
                t = frame.time - origin
            else:  # streams without timestamps (raw elementary streams)
                t = count / rate
            count += 1
            if count > max_frames:
                raise MediaError(path, f"decoding did not finish within {max_frames} frames")
            if time.monotonic() > deadline:
                raise MediaError(path, "decoding timed out")
            yield t, frame


class _Picker:
    """Nearest-frame matching of a sorted target list against frames in time order."""

    def __init__(self, targets: Optional[List[float]], start: float, end: Optional[float], fps: float):
        self.fixed = targets is not None
        self.targets = targets if targets is not None else []
        self.start, self.end, self.fps = start, end, fps
        self.k = 0  # next target (lazy grid: its index on the grid)
        self.picked: List[Tuple[float, np.ndarray]] = []
        self._converted: Tuple[Any, Optional[np.ndarray]] = (None, None)

    def next_target(self) -> Optional[float]:
        if self.fixed:
            return self.targets[self.k] if self.k < len(self.targets) else None
        t = self.start + self.k / self.fps
        if self.end is not None and t >= self.end and self.k > 0:
            return None
        return t

    def _array(self, frame) -> np.ndarray:
        if self._converted[0] is not frame:
            self._converted = (frame, frame.to_ndarray(format="rgb24"))
        return self._converted[1]

    def offer(self, prev, cur) -> bool:
        """Assign every target <= cur's time; False once all fixed targets are assigned."""
        ctime, cframe = cur
        target = self.next_target()
        while target is not None and target <= ctime:
            if prev is not None and (target - prev[0]) <= (ctime - target) + _TIE_EPS:
                chosen = prev
            else:
                chosen = cur
            self.picked.append((chosen[0], self._array(chosen[1])))
            self.k += 1
            target = self.next_target()
        return target is not None


def _fill_after_end(picker: _Picker, last, path: str, fps: float, rate: float,
                    trusted: bool, duration: Optional[float]) -> None:
    """Targets left when the stream ended: the last frame serves those close to it.

    A target further than one sampling step past the last frame means the file ends early:
    when the stream header declared its length the file is truncated (MediaError); when only
    the container did, the missing tail is dropped. On an unknown-length stream, the grid
    stops at the end of the last frame.
    """
    last_time = last[0]
    tolerance = max(1.0, 1.0 / fps) + 1.0 / rate
    while True:
        target = picker.next_target()
        if target is None:
            return
        if not picker.fixed:
            if target >= last_time + 1.0 / rate:
                return
        elif target - last_time > tolerance:
            if trusted:
                raise MediaError(path, f"truncated: frames stop at {last_time:.2f}s but the video "
                                       f"stream declares {duration:.2f}s")
            return
        picker.picked.append((last_time, picker._array(last[1])))
        picker.k += 1


def _decode_video(path: str, fps: float, num_frames: Optional[int], start: Optional[float],
                  end: Optional[float], timeout: float) -> DecodedFrames:
    import av

    deadline = time.monotonic() + timeout
    with av.open(path, timeout=(OPEN_TIMEOUT_S, OPEN_TIMEOUT_S)) as container:
        if not container.streams.video:
            raise MediaError(path, "no video stream in the file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = _frame_rate(stream)
        origin = float(stream.start_time * stream.time_base) if (
            stream.start_time is not None and stream.time_base is not None) else 0.0
        duration, trusted = _declared_duration(stream, container)

        s = max(0.0, float(start)) if start is not None else 0.0
        if duration is not None:
            s = min(s, max(0.0, duration - 1.0 / rate))
            e = duration if end is None else min(float(end), duration)
            e = max(e, s)
            grid = sample_targets(s, e, fps)
            targets: Optional[List[float]] = [grid[i] for i in uniform_indices(len(grid), num_frames)]
            horizon = e
        else:  # unknown length: walk the whole grid, subsample afterwards
            e = float(end) if end is not None else None
            targets = None
            horizon = e
        picker = _Picker(targets, s, e, fps)

        # bound the decoded frames by what a sane stream of this length could hold
        if horizon is not None:
            max_frames = int((horizon + 10.0) * max(rate, 1.0) * 4) + 1000
        else:
            max_frames = 5_000_000
        if targets is not None and s > SEEK_MIN_S and stream.time_base is not None:
            try:
                container.seek(int((s + origin - 1.0) / stream.time_base), stream=stream, backward=True)
            except (av.error.FFmpegError, OSError):
                pass  # decode from where we are; frames before the segment are skipped anyway

        prev = None
        reached_end = True
        for cur in _iter_frames(container, stream, path, origin, rate, max_frames, deadline):
            if not picker.offer(prev, cur):
                reached_end = False
                break
            prev = cur
        if prev is None and not picker.picked:
            raise MediaError(path, "no decodable video frame")

        if reached_end and prev is not None:
            _fill_after_end(picker, prev, path, fps, rate, trusted, duration)
        if not picker.picked:  # the segment lies past the last frame: its nearest frame is the last
            picker.picked.append((prev[0], picker._array(prev[1])))
        picked = picker.picked
        if duration is None:
            duration = (prev[0] if prev is not None else picked[-1][0]) + 1.0 / rate
        if targets is None:
            picked = [picked[i] for i in uniform_indices(len(picked), num_frames)]

    frames = np.stack([a for _, a in picked]) if picked else np.zeros((0, 0, 0, 3), np.uint8)
    return DecodedFrames(frames=frames, timestamps=[float(t) for t, _ in picked], duration=float(duration))


def decode_frames(path: str, fps: float = 1.0, num_frames: Optional[int] = 12,
                  start: Optional[float] = None, end: Optional[float] = None, *,
                  timeout: float = DECODE_TIMEOUT_S) -> DecodedFrames:
    """Decode the frames of `path` picked by the module's sampling rule (num_frames None/0: all).

    Images decode to one frame at time 0. Raises MediaError for anything unreadable.
    """
    path = str(path)
    _check_file(path)
    if is_image_path(path):
        array = read_image_array(path)
        return DecodedFrames(frames=array[None], timestamps=[0.0], duration=0.0)
    import av

    try:
        return _decode_video(path, fps, num_frames, start, end, timeout)
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, MemoryError, RuntimeError) as exc:
        raise MediaError(path, f"undecodable video ({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- images
def read_image_array(path: str) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3); MediaError when missing or undecodable."""
    from PIL import Image

    _check_file(path)
    try:
        with Image.open(path) as img:
            img.load()
            return np.array(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise MediaError(path, f"undecodable image ({type(exc).__name__}: {exc})") from None


def _to_tensor(frame: np.ndarray, transform: Optional[Callable]):
    import torch
    from PIL import Image

    if transform is None:
        return torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1).float().div_(255.0)
    out = transform(Image.fromarray(frame))
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise TypeError(f"transform must return a (3, H, W) tensor, got {type(out).__name__}")
    return out


def load_image(path: str, transform: Optional[Callable] = None, cache=None):
    """One image as a (3, H, W) float tensor (transform applied to the PIL image; else [0, 1])."""
    frame = None
    if cache is not None:
        cached = cache.sample(str(path), num_frames=1)
        if cached is not None and len(cached):
            frame = cached.frames[0]
    if frame is None:
        frame = read_image_array(str(path))
    return _to_tensor(frame, transform)


def load_clip(path: str, num_frames: int = 12, fps: float = 1.0, transform: Optional[Callable] = None,
              start: Optional[float] = None, end: Optional[float] = None, cache=None):
    """Frames of a video (or an image) as ((F, 3, H, W) float, (F,) bool mask), F = num_frames.

    Real frames come first and are True in the mask; the rest are zeros. The transform gets
    PIL images (e.g. `clip_transform(224)` or a backbone's `preprocess_val`); without one,
    frames are RGB in [0, 1]. With a `FrameCache`, cached frames of the same source are used.
    """
    import torch

    path = str(path)
    decoded = None
    if cache is not None:
        decoded = cache.sample(path, num_frames=num_frames, fps=fps, start=start, end=end)
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
