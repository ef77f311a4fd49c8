"""Test helper: write small videos with PyAV whose frames are solid palette colours.

A frame's colour encodes a number (by default the second the frame belongs to), so a test
can tell WHICH source frame a decoder picked by reading the colour back (`palette_index`).
The 64 palette colours are 64 levels apart per channel, far beyond codec error.
"""

from __future__ import annotations

import fractions
from typing import Callable, Optional

import av
import numpy as np

_LEVELS = (32, 96, 160, 224)


def palette(i: int) -> tuple:
    """The i-th of 64 well separated RGB colours (i mod 64)."""
    i %= 64
    return (_LEVELS[i // 16], _LEVELS[(i // 4) % 4], _LEVELS[i % 4])


def palette_index(frame: np.ndarray) -> int:
    """Which palette colour a decoded RGB frame (H, W, 3) shows (nearest by mean colour)."""
    mean = frame.reshape(-1, 3).astype(float).mean(axis=0)
    dists = [np.abs(mean - np.array(palette(i))).sum() for i in range(64)]
    return int(np.argmin(dists))


def write_video(path, num_frames: int, fps: float, width: int = 64, height: int = 48,
                codec: str = "libx264", pix_fmt: str = "yuv420p", fmt: Optional[str] = None,
                color_of: Optional[Callable[[int], int]] = None, faststart: bool = False,
                noise: bool = False, gop: Optional[int] = None, bframes: Optional[int] = None,
                texture: bool = False, rotation: Optional[int] = None) -> str:
    """Encode `num_frames` frames at `fps`; frame i shows palette(color_of(i)) (default: its second).

    `noise=True` writes random pixels instead (large, incompressible packets: useful to
    truncate a file in the middle of its data). `gop=K` puts a keyframe every K frames only
    (libx264: no scene-cut keyframes), `bframes` sets B-frames, `texture=True` adds moving
    low-amplitude noise (so frames depend on their references; the palette colour still reads
    back), `rotation` stores a display matrix rotating the picture counter-clockwise by that
    many degrees (what phones write for portrait video).
    """
    rate = fractions.Fraction(fps).limit_denominator(1001)
    color_of = color_of or (lambda i: int(i / float(rate)))
    options = {"movflags": "faststart"} if faststart else {}
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format=fmt, options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        codec_options = {}
        if codec == "libx264":
            if gop is not None:
                codec_options["x264-params"] = f"keyint={gop}:min-keyint={gop}:scenecut=0"
        elif gop is not None:
            stream.codec_context.gop_size = gop
        if bframes is not None:
            codec_options["bf"] = str(bframes)
        if codec_options:
            stream.options = codec_options
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            if noise:
                array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            else:
                array = np.empty((height, width, 3), np.uint8)
                array[:] = palette(color_of(i))
                if texture:
                    array = (array.astype(np.int16) + rng.integers(-12, 13, array.shape)).clip(0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_video_with_longer_audio(path, video_seconds: int = 5, audio_seconds: int = 10, fps: int = 10) -> str:
    """Matroska with `video_seconds` of video (palette colour = second) and a longer silent PCM track."""
    rate = fractions.Fraction(fps)
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000)
        for i in range(video_seconds * fps):
            array = np.empty((48, 64, 3), np.uint8)
            array[:] = palette(i // fps)
            for packet in video.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        for j in range(audio_seconds):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts = 8000, j * 8000
            for packet in audio.encode(frame):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return str(path)
