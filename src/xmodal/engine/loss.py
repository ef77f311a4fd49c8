"""Symmetric InfoNCE over the global batch, with negatives gathered across ranks.

Each rank scores its n_local texts against all n videos (t2v rows) and all n texts against
its n_local videos (v2t columns), with features gathered *with* gradients. Its loss is the
mean cross-entropy over its own rows and columns; the mean over ranks equals the loss of
one process on the whole batch, and DDP's gradient averaging gives exactly that loss's
gradient (each rank's backward also reaches the other ranks' features through the gather).
For text-conditioned pooling the t2v rows need the gathered per-frame features; mean
pooling only ships one pooled vector per video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from xmodal.engine import distributed as dist_utils
from xmodal.engine.heads import SimilarityHead

MAX_LOGIT_SCALE = 100.0


@dataclass
class LossOutput:
    loss: torch.Tensor           # this rank's loss (its mean over ranks is the global loss)
    t2v: torch.Tensor            # detached components, for logging
    v2t: torch.Tensor
    logits_t2v: torch.Tensor     # (n_local, n) scaled scores of local texts vs all videos
    scale: torch.Tensor


def logit_scale_value(logit_scale: torch.Tensor) -> torch.Tensor:
    """exp(logit_scale) capped at 100 as in CLIP (the parameter is clamped after updates)."""
    return logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)


def contrastive_loss(
    text: torch.Tensor,
    frames: torch.Tensor,
    frame_mask: Optional[torch.Tensor],
    head: SimilarityHead,
    logit_scale: torch.Tensor,
) -> LossOutput:
    """Symmetric cross-entropy for the local part (text (n,D), frames (n,F,D)) of the batch."""
    n = text.shape[0]
    if frames.shape[0] != n:
        raise ValueError(f"{n} texts but {frames.shape[0]} videos in the batch")
    frames, frame_mask = head.compact_visual(frames, frame_mask)
    # ranks may hold different batch sizes (dropped samples) and frame counts (a batch of
    # images only has F=1): pad frames to the largest F with masked-out zeros
    shapes = dist_utils.gather_ints([n, frames.shape[1]], text.device)
    sizes = [s[0] for s in shapes]
    f_max = max(s[1] for s in shapes)
    if frames.shape[1] < f_max:
        pad = f_max - frames.shape[1]
        frames = torch.cat([frames, frames.new_zeros(n, pad, frames.shape[2])], dim=1)
        frame_mask = torch.cat([frame_mask, frame_mask.new_zeros(n, pad)], dim=1)
    all_text = dist_utils.gather_with_grad(text.float(), sizes)
    all_frames = dist_utils.gather_with_grad(frames.float(), sizes)
    all_mask = dist_utils.gather_no_grad(frame_mask, sizes)
    rank, total = dist_utils.rank(), sum(sizes)
    labels = torch.arange(n, device=text.device) + sum(sizes[:rank])
    scale = logit_scale_value(logit_scale)
    logits_t2v = scale * head(text, all_frames, all_mask, max_bytes=None)          # (n, N)
    logits_v2t = scale * head(all_text, frames, frame_mask, max_bytes=None).t()    # (n, N)
    # sum over this rank's rows, normalised so that the mean over ranks is the global mean
    weight = len(sizes) / total
    t2v = F.cross_entropy(logits_t2v, labels, reduction="sum") * weight
    v2t = F.cross_entropy(logits_v2t, labels, reduction="sum") * weight
    return LossOutput((t2v + v2t) / 2, t2v.detach(), v2t.detach(), logits_t2v.detach(), scale.detach())
