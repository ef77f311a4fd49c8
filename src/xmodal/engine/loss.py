"""Symmetric InfoNCE over the global batch, with negatives gathered across ranks.

Each rank scores its n_local texts against all n videos (t2v rows) and all n texts against
its n_local videos (v2t columns), with features gathered *with* gradients. Its loss is the
mean cross-entropy over its own rows and columns; the mean over ranks equals the loss of
one process on the whole batch, and DDP's gradient averaging gives exactly that loss's
gradient (each rank's backward also reaches the other ranks' features through the gather).
For text-conditioned pooling the t2v rows need the gathered per-frame features; mean
pooling only ships one pooled vector per video.

Ranks may hold different batch sizes (samples dropped for unreadable media) and frame counts.
With `pad_to=(max_rows, max_frames)` (static bounds every rank knows, e.g. the per-rank
micro-batch size and the configured frame budget) every rank pads its part to that fixed
shape, so the gathers need no size exchange and nothing is read back to the host: padding
rows travel with a validity flag, their columns get -inf logits and they have no rows in the
loss. Without `pad_to` the sizes are exchanged first (`gather_ints`, a host synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

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
    logits_t2v: torch.Tensor     # (n_local, n) scaled scores of local texts vs all videos (with
                                 # `pad_to`: (n_local, world * max_rows), -inf in padding columns)
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
    pad_to: Optional[Tuple[int, int]] = None,
) -> LossOutput:
    """Symmetric cross-entropy for the local part (text (n,D), frames (n,F,D)) of the batch.

    `pad_to=(max_rows, max_frames)`: bounds on n and F that are the same on every rank (see the
    module docstring); the features are then gathered at that fixed shape without a host sync.
    """
    n = text.shape[0]
    if frames.shape[0] != n:
        raise ValueError(f"{n} texts but {frames.shape[0]} videos in the batch")
    frames, frame_mask = head.compact_visual(frames, frame_mask)
    if pad_to is not None:
        return _padded_contrastive_loss(text, frames, frame_mask, head, logit_scale, pad_to)
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
    return _symmetric_loss(logits_t2v, logits_v2t, labels, len(sizes) / total, scale)


def _padded_contrastive_loss(text, frames, frame_mask, head: SimilarityHead, logit_scale,
                             pad_to: Tuple[int, int]) -> LossOutput:
    """`contrastive_loss` on a fixed-shape layout: every rank ships `max_rows` rows of
    [text, `max_frames` frames] plus a row-validity flag; no sizes are exchanged."""
    n, f = frames.shape[:2]
    max_rows, max_frames = int(pad_to[0]), head.compact_frame_count(int(pad_to[1]))
    if n > max_rows or f > max_frames:
        raise ValueError(f"contrastive_loss(pad_to={tuple(pad_to)}): this rank holds {n} rows of {f} (compacted) "
                         f"frames, more than the bound of {max_rows} rows of {max_frames} frames")
    dev = text.device
    # one gather with gradient for texts and frames: row r = [text_r, frame_1..frame_Fmax]
    feats = torch.cat([text.float().unsqueeze(1), frames.float()], dim=1)
    feats = F.pad(feats, (0, 0, 0, max_frames - f, 0, max_rows - n))                   # (R, 1+Fmax, D)
    # and one without: [row is real, frame mask], padding rows and frames False
    flags = torch.zeros(max_rows, 1 + max_frames, dtype=torch.bool, device=dev)         # (R, 1+Fmax)
    flags[:n, 0] = True
    flags[:n, 1:1 + f] = frame_mask.to(torch.bool)
    all_feats = dist_utils.gather_with_grad(feats)                                       # (W*R, 1+Fmax, D)
    all_flags = dist_utils.gather_no_grad(flags)
    all_text, all_frames = all_feats[:, 0], all_feats[:, 1:]
    valid, all_mask = all_flags[:, 0], all_flags[:, 1:]
    labels = torch.arange(n, device=dev) + dist_utils.rank() * max_rows
    scale = logit_scale_value(logit_scale)
    # padding videos (t2v) and padding texts (v2t) are columns that no row may pick
    padding = ~valid
    logits_t2v = (scale * head(text, all_frames, all_mask, max_bytes=None)).masked_fill(padding, float("-inf"))
    logits_v2t = (scale * head(all_text, frames, frame_mask, max_bytes=None).t()).masked_fill(padding, float("-inf"))
    # sum over this rank's (real) rows; the mean over ranks is the mean over all real rows
    return _symmetric_loss(logits_t2v, logits_v2t, labels, dist_utils.world_size() / valid.sum().to(torch.float32),
                           scale)


def _symmetric_loss(logits_t2v, logits_v2t, labels, weight, scale) -> LossOutput:
    """Both directions' summed cross-entropy on this rank's rows, times `weight`, averaged."""
    t2v = F.cross_entropy(logits_t2v, labels, reduction="sum") * weight
    v2t = F.cross_entropy(logits_v2t, labels, reduction="sum") * weight
    return LossOutput((t2v + v2t) / 2, t2v.detach(), v2t.detach(), logits_t2v.detach(), scale.detach())
