"""Seeking decode: the picked frames are exactly those of a full front-to-back decode, for less work."""

from __future__ import annotations

import functools
import math

import av
import numpy as np
import pytest

from videos import palette_index, write_video
from xmodal.data.media import (
    _declared_duration,
    _frame_rate,
    decode_frames,
    load_clip,
    sample_targets,
    uniform_indices,
)

MSRVTT = "video/msrvtt_1kA"
CASES = [{}, {"num_frames": 64}, {"start": 3.3, "end": 9.1}, {"start": 8.0}, {"fps": 3.0, "num_frames": 7}]


@functools.lru_cache(maxsize=2)
def _every_frame(path):
    with av.open(path) as c:
        s = c.streams.video[0]
        origin = float(s.start_time * s.time_base) if s.start_time is not None else 0.0
        duration, _ = _declared_duration(s, c)
        rate = _frame_rate(s)
        frames = [(f.time - origin, f.to_ndarray(format="rgb24")) for f in c.decode(s)]
    return duration, rate, frames


def full_decode_choice(path, fps=1.0, num_frames=12, start=None, end=None):
    """The sampling rule applied to EVERY decoded frame (what decoding did before seeking existed)."""
    duration, rate, frames = _every_frame(path)
    lo = min(max(0.0, start or 0.0), max(0.0, duration - 1 / rate))
    hi = max(duration if end is None else min(end, duration), lo)
    grid = sample_targets(lo, hi, fps)
    times = [t for t, _ in frames]
    chosen = []
    for target in (grid[i] for i in uniform_indices(len(grid), num_frames)):
        j = int(np.searchsorted(times, target, side="left"))  # first frame at/after the target
        if j == len(times):
            if target - times[-1] > max(1.0, 1 / fps) + 1 / rate:
                continue
            j -= 1
        elif j > 0 and target - times[j - 1] <= times[j] - target + 1e-9:
            j -= 1  # nearest; a tie goes to the earlier frame
        chosen.append(frames[j])
    return chosen, len(frames)


def assert_same_frames(path, **kw):
    want, total = full_decode_choice(path, **kw)
    got = decode_frames(path, **kw)
    assert got.timestamps == pytest.approx([t for t, _ in want], abs=1e-9), kw
    for (t, a), b in zip(want, got.frames):
        assert np.array_equal(a, b), (path, kw, t)
    return got, total


@pytest.mark.parametrize("name", ["video7202", "video7348", "video7375", "video7732", "video8331", "video8807",
                                  "video8812", "video8914", "video9348", "video9474", "video9770", "video9771",
                                  "video9908"])
def test_real_msrvtt_clips_pixel_identical_to_full_decode(shared_data, name):
    path = str(shared_data / MSRVTT / f"{name}.mp4")
    for kw in CASES:
        assert_same_frames(path, **kw)


@pytest.fixture(scope="module")
def sparse_clips(tmp_path_factory):
    """60-s textured clips, keyframe every 4.5 s, B-frames (mp4), in mp4 / mkv / webm."""
    folder = tmp_path_factory.mktemp("sparse")
    return {
        "mp4": write_video(folder / "s.mp4", 600, 10.0, width=96, height=64, texture=True, gop=45, bframes=3),
        "mkv": write_video(folder / "s.mkv", 600, 10.0, width=96, height=64, texture=True, gop=45),
        "webm": write_video(folder / "s.webm", 600, 10.0, width=64, height=48, texture=True, gop=45,
                            codec="libvpx-vp9"),
    }


@pytest.mark.parametrize("ext", ["mp4", "mkv", "webm"])
def test_sparse_keyframes_pixel_identical_and_cheaper(sparse_clips, ext):
    path = sparse_clips[ext]
    for kw in CASES + [{"num_frames": 4}, {"num_frames": None}, {"start": 40.05, "end": 52.0}, {"fps": 0.5}]:
        got, total = assert_same_frames(path, **kw)
    twelve = decode_frames(path, num_frames=12)
    assert twelve.seeks >= 8 and twelve.decoded < total / 2  # before: every one of the 600 frames
    late = decode_frames(path, num_frames=12, start=50.0, end=55.0)  # a moment: reached by seeking too
    assert late.seeks >= 1 and late.decoded < 100
    assert [palette_index(f) for f in late.frames] == [50, 51, 52, 53, 54]
    assert decode_frames(path, seek=False).decoded >= total - 10  # front to back up to the last pick


def test_long_video_decodes_only_near_the_picks(tmp_path):
    """A 40-min 1-fps clip (keyframe every 10 s): 12 picks decode a few dozen frames, not 2400."""
    path = write_video(tmp_path / "long.mp4", 2400, 1.0, width=32, height=32, gop=10,
                       color_of=lambda i: i // 60)
    got = decode_frames(path, num_frames=12)
    grid = list(range(2400))
    assert got.timestamps == [float(grid[i]) for i in uniform_indices(2400, 12)]
    assert [palette_index(f) for f in got.frames] == [int(t) // 60 for t in got.timestamps]
    assert got.decoded <= 12 * 11 and got.grid == 2400


def test_load_clip_can_return_frame_times(tmp_path):
    path = write_video(tmp_path / "v.mp4", 50, 10.0)
    pixels, mask, times = load_clip(path, num_frames=8, return_times=True)
    assert times == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0]) and mask.sum() == 5
    plain = load_clip(path, num_frames=8)
    assert len(plain) == 2 and plain[0].equal(pixels)


def test_stream_without_index_or_duration_decodes_front_to_back(tmp_path):
    """Raw H.264 (no container index, no duration, no timestamps): the unknown-length path, same rule."""
    path = write_video(tmp_path / "raw.h264", 300, 25.0, fmt="h264", gop=50, texture=True)
    got = decode_frames(path, num_frames=5)
    assert [palette_index(f) for f in got.frames] == uniform_indices(12, 5)
    assert got.seeks == 0 and math.isclose(got.duration, 12.0)


@pytest.mark.parametrize("fmt,ext", [("mpegts", "ts"), ("avi", "avi"), ("mov", "mov")])
def test_other_containers_match_front_to_back(tmp_path, fmt, ext):
    """MPEG-TS (no index: timestamp search may overshoot), AVI, MOV: seeking never changes the picks."""
    path = write_video(tmp_path / f"s.{ext}", 300, 10.0, width=64, height=48, texture=True, gop=45, fmt=fmt)
    for kw in ({}, {"num_frames": 24}, {"start": 20.05, "end": 26.0}, {"start": 12.0}):
        got, ref = decode_frames(path, **kw), decode_frames(path, seek=False, **kw)
        assert got.timestamps == ref.timestamps and np.array_equal(got.frames, ref.frames), kw
