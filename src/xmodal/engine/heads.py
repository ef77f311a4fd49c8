"""Similarity heads: turn per-frame visual features and text features into a T x V score.

Two parameter-free heads, as in the Cross-Modal Adapter paper, and one trained head:

- ``mean``: CLIP4Clip's meanP. Frames are L2-normalised, averaged over the real frames and
  normalised again; the score is the cosine with the text.
- ``text_conditioned``: for text t and video v with frames f_1..f_F,
  alpha_j = softmax_j(<t, f_j> / tau) over the real frames, v_t = sum_j alpha_j f_j and the
  score is cos(t, v_t). Whether t and f_j are L2-normalised before alpha is `normalize`.
  The default is False with tau = 5, as in the official code (``q_score_temp=5``,
  ``t_emb_norm = v_emb_norm = 0``): CLIP's unnormalised dot products (tens for ViT-B/32) give
  a usefully peaked softmax at tau = 5, while cosines in [-1, 1] divided by 5 would be almost
  uniform; set ``normalize=True`` together with a small tau (e.g. 0.01) for the other variant.

- ``seq_transformer``: CLIP4Clip's seqTransf, the frozen-backbone baseline MV-Adapter compares
  against. Frame features plus learned frame position embeddings go through a 4-layer
  transformer (width = embed dim, heads = width // 64) with padded frames masked out of the
  attention; its output is added to the input frames (residual) and then mean-pooled as
  ``mean``. As in CLIP4Clip the blocks start as copies of the text transformer's first blocks
  and the position table as the text's positional embedding (when the widths agree; else a
  fresh init, which `SeqTransformer.initialised_from` records). Its weights belong to the
  model: `AdaptedModel.use_head(head)` builds them (or takes them from a loaded adapter), trains
  them with the adapter and saves them in the adapter checkpoint. A head whose weights were
  never bound refuses to score.

Images are the one-frame case of every head (both reduce to plain CLIP cosine similarity).
The text x video score of a whole test set never builds a T x V x F x D tensor: texts are
processed in chunks whose intermediate size is capped by ``max_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.errors import XModalError

POOLINGS = ("mean", "text_conditioned", "seq_transformer")
#: poolings with weights of their own (bound with `AdaptedModel.use_head`)
TRAINED_POOLINGS = ("seq_transformer",)
SEQ_LAYERS = 4
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


class SeqTransformer(nn.Module):
    """CLIP4Clip's seqTransf: frames (V, F, D) -> transformer(frames + pos) + frames."""

    def __init__(self, width: int, layers: int = SEQ_LAYERS, heads: Optional[int] = None, max_frames: int = 77,
                 act_layer=nn.GELU):
        super().__init__()
        from open_clip.transformer import ResidualAttentionBlock

        self.heads = heads or max(1, width // 64)
        self.frame_position_embeddings = nn.Embedding(max_frames, width)
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, self.heads, act_layer=act_layer) for _ in range(layers))
        self.initialised_from = "random"

    def init_from_text(self, text_tower: nn.Module) -> bool:
        """Copy the text transformer's first blocks and positional embedding (CLIP4Clip's init)."""
        blocks = text_tower.transformer.resblocks
        pos = text_tower.positional_embedding
        width = self.frame_position_embeddings.embedding_dim
        if (len(blocks) < len(self.resblocks) or pos.shape[-1] != width
                or blocks[0].attn.embed_dim != width or blocks[0].attn.num_heads != self.heads):
            return False
        with torch.no_grad():
            for mine, theirs in zip(self.resblocks, blocks):
                mine.load_state_dict({k: v for k, v in theirs.state_dict().items()}, strict=True)
            rows = min(pos.shape[0], self.frame_position_embeddings.num_embeddings)
            self.frame_position_embeddings.weight[:rows].copy_(pos[:rows])
        self.initialised_from = "text transformer"
        return True

    def forward(self, frames: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        v, f, _ = frames.shape
        if f > self.frame_position_embeddings.num_embeddings:
            raise XModalError(f"seq_transformer head: {f} frames > {self.frame_position_embeddings.num_embeddings} "
                              f"frame positions")
        valid = _valid_mask(mask, frames)
        x = frames + self.frame_position_embeddings.weight[:f].to(frames.dtype)
        # CLIP4Clip: (1 - mask) * -1e6 on the keys of padded frames, per clip, for every head
        bias = (~valid).to(frames.dtype)[:, None, :].expand(v, f, f) * -1e6
        bias = bias.repeat_interleave(self.heads, dim=0)
        for block in self.resblocks:
            x = block(x, attn_mask=bias)
        return x + frames


@dataclass
class SimilarityHead:
    """A pooling head with its settings; `head(text, frames, mask)` -> cosine scores (T, V)."""

    pooling: str = "text_conditioned"
    temperature: float = 5.0
    normalize: bool = False
    max_bytes: Optional[int] = DEFAULT_MAX_BYTES
    #: the weights of a trained pooling (seq_transformer), bound by `AdaptedModel.use_head`
    module: Optional[nn.Module] = field(default=None, repr=False, compare=False)

    @property
    def trained(self) -> bool:
        """Whether this pooling has weights of its own (trained with the adapter)."""
        return self.pooling in TRAINED_POOLINGS

    def build(self, backbone) -> nn.Module:
        """Fresh weights for a trained pooling on `backbone` (CLIP4Clip init from the text tower)."""
        if self.pooling != "seq_transformer":
            raise XModalError(f"head.pooling={self.pooling!r} has no weights to build")
        text = backbone.text_tower
        blocks = text.transformer.resblocks
        act = type(blocks[0].mlp.gelu) if hasattr(blocks[0].mlp, "gelu") else nn.GELU
        module = SeqTransformer(backbone.embed_dim, SEQ_LAYERS, max_frames=int(text.positional_embedding.shape[0]),
                                act_layer=act)
        module.init_from_text(text)
        return module

    def transform(self, frames: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.trained:
            return frames
        if self.module is None:
            raise XModalError(f"head.pooling={self.pooling!r} has weights that were never bound to this head: "
                              f"call model.use_head(head) (it builds them, or takes them from the loaded adapter)")
        return self.module(frames, mask)

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
        if self.pooling == "seq_transformer":
            return mean_similarity(text, self.transform(frames, mask), mask)
        return text_conditioned_similarity(
            text, frames, mask, self.temperature, self.normalize,
            self.max_bytes if max_bytes == -1 else max_bytes,
        )

    def compact_frame_count(self, num_frames: int) -> int:
        """Frames per video in `compact_visual`'s output for videos of `num_frames` frames."""
        return 1 if self.pooling == "mean" else int(num_frames)

    def compact_visual(self, frames: torch.Tensor, mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The smallest (V, F', D) form that gives the same scores (sent across ranks).

        Mean pooling does not depend on the text, so one pooled "frame" per video suffices;
        text-conditioned pooling needs every frame, and so does seq_transformer (its frames are
        transformed when scored, with the gradient flowing into its weights).
        """
        if self.pooling == "mean":
            pooled = mean_pool(frames, mask).unsqueeze(1)
            return pooled, torch.ones(pooled.shape[:2], dtype=torch.bool, device=pooled.device)
        return frames, _valid_mask(mask, frames)

