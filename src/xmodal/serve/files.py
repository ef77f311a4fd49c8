"""Serving an item's file and keyframes without ever opening a path taken from a request.

A request names an index and an item id; the file is the one that index registered for that
id. It is served only if, after resolving every symlink, it still lies inside the index's
media root: a registered file that is a symlink leading elsewhere is refused.
"""

from __future__ import annotations

import io
import os
from typing import Optional, Tuple

from xmodal.errors import XModalError

THUMB_MAX_SIDE = 320
JPEG_QUALITY = 85


class MediaAccessError(XModalError):
    """A registered media file cannot be served; `.status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def checked_media_path(media: str, media_root: str, item_id: str) -> str:
    """The real path of a registered file, or MediaAccessError (404 missing, 403 outside the root)."""
    real = os.path.realpath(media)
    if not _inside(real, os.path.realpath(media_root)):
        raise MediaAccessError(f"item {item_id!r}: its file resolves outside the media root {media_root}; refused", 403)
    if not os.path.isfile(real):
        raise MediaAccessError(f"item {item_id!r}: media file {os.path.basename(media)} is missing on the server", 404)
    return real


def _jpeg(image) -> bytes:
    image = image.convert("RGB")
    image.thumbnail((THUMB_MAX_SIDE, THUMB_MAX_SIDE))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _video_frame(path: str, t: float):
    """The first decoded frame at or after t (the last one if t is past the end), and its time."""
    import av

    with av.open(path, timeout=(5.0, 5.0)) as container:
        if not container.streams.video:
            raise MediaAccessError(f"{os.path.basename(path)}: no video stream", 422)
        stream = container.streams.video[0]
        origin = float(stream.start_time * stream.time_base) if (
            stream.start_time is not None and stream.time_base is not None) else 0.0
        if t > 1.0 and stream.time_base is not None:
            container.seek(int((t + origin - 1.0) / stream.time_base), stream=stream, backward=True)
        last: Tuple[Optional[float], object] = (None, None)
        for n, frame in enumerate(container.decode(stream)):
            ft = (frame.time - origin) if frame.time is not None else None
            last = (ft, frame)
            if ft is None or ft + 1e-6 >= t or n > 100_000:
                break
        if last[1] is None:
            raise MediaAccessError(f"{os.path.basename(path)}: no decodable frame", 422)
        return last[1].to_image(), last[0]


def thumbnail(path: str, kind: str, t: float = 0.0) -> Tuple[bytes, float]:
    """JPEG bytes of the frame at `t` seconds (images: the image) and the frame's actual time."""
    import av
    from PIL import Image

    try:
        if kind == "image":
            with Image.open(path) as img:
                img.load()
                return _jpeg(img), 0.0
        image, at = _video_frame(path, max(0.0, float(t)))
        return _jpeg(image), float(at if at is not None else t)
    except MediaAccessError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaAccessError(f"{os.path.basename(path)}: cannot decode ({type(exc).__name__})", 422) from None
