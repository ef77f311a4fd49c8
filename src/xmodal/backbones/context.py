"""Forward context shared by the backbone and the methods injected into it.

The vision tower sees a video as B*F independent frames. Temporal methods (MV-Adapter,
MSTA, ST-Adapter) need F to fold (B*F, L, D) back into (B, F, L, D); they read it here
instead of changing CLIP's forward signatures. Images are the F=1 case.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass(frozen=True)
class VisualContext:
    num_frames: int = 1
    frame_mask: Optional[torch.Tensor] = None  # (B, F) bool, True = real frame


_VISUAL = contextvars.ContextVar("xmodal_visual_context", default=VisualContext())


def visual_context() -> VisualContext:
    """The context of the vision forward pass in progress (F=1 outside `frames(...)`)."""
    return _VISUAL.get()


def num_frames() -> int:
    return _VISUAL.get().num_frames


@contextlib.contextmanager
def frames(num_frames: int, frame_mask: Optional[torch.Tensor] = None) -> Iterator[VisualContext]:
    """Within this block the vision tower's batch is (B*num_frames) frames of B clips."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    ctx = VisualContext(num_frames=num_frames, frame_mask=frame_mask)
    token = _VISUAL.set(ctx)
    try:
        yield ctx
    finally:
        _VISUAL.reset(token)
