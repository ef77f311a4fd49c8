"""Similarity heads: turn per-frame visual features and text features into a T x V score.

Two parameter-free heads, as in the Cross-Modal Adapter paper:

- ``mean``: CLIP4Clip's meanP. Frames are L2-normalised, averaged over the real frames and
  normalised again; the score is the cosine with the text.
- ``text_conditioned``: for text t and video v with frames f_1..f_F,
  alpha_j = softmax_j(<t, f_j> / tau) over the real frames, v_t = sum_j alpha_j f_j and the
  score is cos(t, v_t). Whether t and f_j are L2-normalised before alpha is `normalize`.
  The default is False with tau = 5, as in the official code (``q_score_temp=5``,
  ``t_emb_norm = v_emb_norm = 0``): CLIP's unnormalised dot products (tens for ViT-B/32) give
  a usefully peaked softmax at tau = 5, while cosines in [-1, 1] divided by 5 would be almost
  uniform; set ``normalize=True`` together with a small tau (e.g. 0.01) for the other variant.

Images are the one-frame case of either head (both reduce to plain CLIP cosine similarity).
The text x video score of a whole test set never builds a T x V x F x D tensor: texts are
processed in chunks whose intermediate size is capped by ``max_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from xmodal.errors import XModalError

POOLINGS = ("mean", "text_conditioned")
DEFAULT_MAX_BYTES = 256 * 2**20


def _valid_mask(mask: Optional[torch.Tensor], frames: torch.Tensor) -> torch.Tensor:
    """(V, F) bool with at least one True per row (an all-padding clip counts all frames)."""
    if mask is None:
        return torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
    if mask.shape != frames.shape[:2]:
        raise ValueError(f"frame mask must be {tuple(frames.shape[:2])}, got {tuple(mask.shape)}")
    mask = mask.to(device=frames.device, dtype=torch.bool)
    return mask | ~mask.any(dim=-1, keepdim=True)


def mean_pool(frames: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP4Clip meanP: normalise frames, average the real ones, normalise. (V,F,D) -> (V,D)."""
    frames = F.normalize(frames.float(), dim=-1)
    w = _valid_mask(mask, frames).to(frames.dtype).unsqueeze(-1)
    pooled = (frames * w).sum(dim=1) / w.sum(dim=1)
    return F.normalize(pooled, dim=-1)


def mean_similarity(text: torch.Tensor, frames: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cosine of each text with each mean-pooled video, (T, V)."""
    return F.normalize(text.float(), dim=-1) @ mean_pool(frames, mask).t()


def text_chunk_size(num_videos: int, num_frames: int, dim: int, max_bytes: int, element_size: int = 4) -> int:
    """How many texts fit in one chunk: alpha and its softmax (Tc,V,F) plus the pooled
    videos and their normalised copy (V,Tc,D) must stay under `max_bytes`."""
    per_text = max(1, num_videos * (2 * num_frames + 2 * dim) * element_size)
    return max(1, int(max_bytes) // per_text)


def text_conditioned_similarity(
    text: torch.Tensor,
    frames: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    temperature: float = 5.0,
    normalize: bool = False,
    max_bytes: Optional[int] = DEFAULT_MAX_BYTES,
) -> torch.Tensor:
    """cos(t, sum_j softmax_j(<t,f_j>/tau) f_j) for every text and video, (T, V).

    Per chunk of texts: alpha = einsum over (Tc, V, F), masked softmax over frames, then the
    weighted frame average for all texts of the chunk with one bmm per video batch
    ((V, Tc, F) @ (V, F, D) -> (V, Tc, D)). `max_bytes=None` processes all texts at once.
    """
    if temperature <= 0:
        raise XModalError(f"head.temperature must be > 0, got {temperature}")
    text = text.float()
    frames = frames.float()
    valid = _valid_mask(mask, frames)
    if normalize:
        text = F.normalize(text, dim=-1)
        frames = F.normalize(frames, dim=-1)
    text_unit = F.normalize(text, dim=-1)
    t_all, (v, f, d) = text.shape[0], frames.shape
    step = t_all if max_bytes is None else min(t_all, text_chunk_size(v, f, d, max_bytes))
    step = max(step, 1)
    neg = torch.finfo(frames.dtype).min
    out = []
    for start in range(0, t_all, step):
        t = text[start:start + step]
        alpha = torch.einsum("td,vfd->tvf", t, frames) / temperature
        alpha = alpha.masked_fill(~valid.unsqueeze(0), neg).softmax(dim=-1)
        pooled = torch.bmm(alpha.permute(1, 0, 2), frames)  # (V, Tc, D)
        pooled = F.normalize(pooled, dim=-1)
        out.append(torch.einsum("vtd,td->tv", pooled, text_unit[start:start + step]))
    if not out:
        return text.new_zeros((0, v))
    return torch.cat(out, dim=0)


@dataclass
class SimilarityHead:
    """A pooling head with its settings; `head(text, frames, mask)` -> cosine scores (T, V)."""

    pooling: str = "text_conditioned"
    temperature: float = 5.0
    normalize: bool = False
    max_bytes: Optional[int] = DEFAULT_MAX_BYTES

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise XModalError(f"head.pooling={self.pooling!r}: expected one of {list(POOLINGS)}")
        if self.temperature <= 0:
            raise XModalError(f"head.temperature must be > 0, got {self.temperature}")

    def __call__(self, text: torch.Tensor, frames: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 max_bytes: Optional[int] = -1) -> torch.Tensor:
        if frames.dim() == 2:  # already one vector per item (images)
            frames = frames.unsqueeze(1)
            mask = None
        if self.pooling == "mean":
            return mean_similarity(text, frames, mask)
        return text_conditioned_similarity(
            text, frames, mask, self.temperature, self.normalize,
            self.max_bytes if max_bytes == -1 else max_bytes,
        )

    def compact_visual(self, frames: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The smallest (V, F', D) form that gives the same scores (sent across ranks).

        Mean pooling does not depend on the text, so one pooled "frame" per video suffices;
        text-conditioned pooling needs every frame.
        """
        if self.pooling == "mean":
            pooled = mean_pool(frames, mask).unsqueeze(1)
            return pooled, torch.ones(pooled.shape[:2], dtype=torch.bool, device=pooled.device)
        return frames, _valid_mask(mask, frames)

