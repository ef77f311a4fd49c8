"""Where in a retrieved video the query happens: per-frame weights and their timestamps.

The text-conditioned pooling head scores a video as cos(t, sum_j alpha_j f_j) with
alpha_j = softmax_j(<t, f_j> / tau) over the real frames; alpha is therefore exactly how much
each sampled frame contributes to the match, and the frame with the largest alpha is where
the query "looks". Under mean pooling every real frame weighs the same.

Frame timestamps follow `xmodal.data.media`'s sampling rule (the targets of the 1/fps grid
over the item's segment, or the stream's declared duration, then `uniform_indices`), read
from the container header only (no decoding). The decoder picks the frame nearest each target, so a timestamp
is within half a source-frame period of the frame that was encoded.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F


def frame_weights(query: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor, head) -> torch.Tensor:
    """Pooling weights of each frame for one query under `head`: (D,), (F, D), (F,) -> (F,), 0 on padding.

    Same arithmetic as `xmodal.engine.heads.text_conditioned_similarity` (an all-padding clip
    counts all its frames), so sum_j w_j f_j is the vector the head compares with the query.
    """
    frames = frames.float()
    valid = mask.bool()
    if not bool(valid.any()):
        valid = torch.ones_like(valid)
    if head.pooling == "mean":
        w = valid.float()
        return w / w.sum()
    q = query.float()
    if head.normalize:
        q = F.normalize(q, dim=-1)
        frames = F.normalize(frames, dim=-1)
    logits = (frames @ q) / head.temperature
    logits = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    return logits.softmax(dim=-1) * valid


def video_duration(path: str) -> Optional[float]:
    """Declared duration of the first video stream (stream header, else container), or None."""
    import av

    try:
        with av.open(str(path), timeout=(5.0, 5.0)) as container:
            if not container.streams.video:
                return None
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
                return float(stream.duration * stream.time_base)
            if container.duration is not None and container.duration > 0:
                return container.duration / 1_000_000.0
    except (av.error.FFmpegError, OSError, ValueError):
        return None
    return None


def sampled_frame_times(path: str, fps: float, num_frames: int, start: Optional[float] = None,
                        end: Optional[float] = None) -> Optional[List[float]]:
    """Times (s, from the start of the file) of the frames `load_clip(path, num_frames, fps, start=, end=)`
    samples, or None when the video's duration cannot be read."""
    from xmodal.data.media import sample_targets, uniform_indices

    duration = video_duration(path)
    if duration is None:
        return None
    s = max(0.0, float(start)) if start is not None else 0.0
    e = duration if end is None else min(float(end), duration)
    grid = sample_targets(s, max(e, s), fps)
    return [round(grid[i], 6) for i in uniform_indices(len(grid), num_frames)]


def moments(weights: torch.Tensor, times: List[float]) -> dict:
    """{"moments": [{"time", "weight"}...], "best_time"} for the real frames (weights (F,), real first)."""
    w = weights[: len(times)].tolist()
    best = max(range(len(times)), key=lambda j: w[j])
    return {"moments": [{"time": float(t), "weight": float(x)} for t, x in zip(times, w)],
            "best_time": float(times[best])}
