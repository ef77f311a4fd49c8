"""DualEncoder: an OpenCLIP model plus what retrieval needs around it.

Wraps (never forks) `open_clip.CLIP`: methods inject into its blocks through hooks, and
the wrapper adds tokenisation with a word budget, per-frame video encoding and access to
each tower's residual blocks by modality.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from xmodal.backbones import context

VISION = "vision"
TEXT = "text"
MODALITIES = (VISION, TEXT)


class DualEncoder(nn.Module):
    """A CLIP-like dual encoder: `encode_text`, `encode_image`, `encode_video`.

    Features are returned unnormalised (callers L2-normalise where the method says so);
    video features are per frame, shape (B, F, D).
    """

    def __init__(
        self,
        clip: nn.Module,
        name: str,
        tokenizer: Callable,
        preprocess_train: Optional[Callable] = None,
        preprocess_val: Optional[Callable] = None,
        pretrained: Optional[str] = None,
        weights_info: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self.clip = clip
        self.name = name
        self.pretrained = pretrained
        from xmodal.backbones.activation import activation_name  # open_clip: imported only when built

        # provenance: {"pretrained", "weights_path", "weights_sha256", "activation", "format"}
        self.weights_info: Dict[str, Any] = dict(weights_info) if weights_info else {
            "pretrained": "random", "weights_path": None, "weights_sha256": None,
            "activation": activation_name(clip), "format": "random",
        }
        self.tokenizer = tokenizer
        self.preprocess_train = preprocess_train
        self.preprocess_val = preprocess_val

    # ----------------------------------------------------------------- structure
    @property
    def visual(self) -> nn.Module:
        return self.clip.visual

    @property
    def text_tower(self) -> nn.Module:
        """The module that owns the text transformer (CLIP itself, or CustomTextCLIP.text)."""
        return self.clip.text if hasattr(self.clip, "text") else self.clip

    def blocks(self, modality: str) -> nn.ModuleList:
        """Residual attention blocks of one tower, input to output."""
        if modality == VISION:
            return self.clip.visual.transformer.resblocks
        if modality == TEXT:
            return self.text_tower.transformer.resblocks
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")

    def width(self, modality: str) -> int:
        return self.blocks(modality)[0].ln_1.normalized_shape[0]

    def num_layers(self, modality: str) -> int:
        return len(self.blocks(modality))

    @property
    def embed_dim(self) -> int:
        proj = self.clip.visual.proj
        return proj.shape[1] if proj is not None else self.width(VISION)

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def context_length(self) -> int:
        return int(self.text_tower.context_length)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    # ---------------------------------------------------------------- tokenising
    def tokenize(self, texts: Sequence[str] | str, max_words: Optional[int] = None) -> torch.Tensor:
        """CLIP BPE tokens, (N, context_length).

        `max_words` is the CLIP4Clip token budget (SOT and EOT included, e.g. 32): longer
        captions are cut and the last kept position becomes the end-of-text token, so the
        argmax-EOT pooling of CLIP still finds it.
        """
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenizer(list(texts), context_length=self.context_length)
        if max_words is None or max_words >= self.context_length:
            return tokens
        if max_words < 2:
            raise ValueError(f"max_words must be >= 2 (start and end tokens), got {max_words}")
        eot = int(getattr(self.tokenizer, "eot_token_id", tokens.max()))
        tokens = tokens.clone()
        lengths = (tokens != 0).sum(dim=1)
        too_long = lengths > max_words
        if too_long.any():
            tokens[too_long, max_words - 1] = eot
            tokens[too_long, max_words:] = 0
        return tokens

    # ----------------------------------------------------------------- encoding
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) tokens -> (N, D) projected text features."""
        return self.clip.encode_text(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, D) projected image features (one-frame clips)."""
        with context.frames(1):
            return self.clip.encode_image(images)

    def encode_video(self, video: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, F, 3, H, W) -> (B, F, D) per-frame features.

        Frames go through the vision tower as one (B*F) batch; temporal methods read F from
        `xmodal.backbones.context`. Padded frames (mask False) are encoded like the others
        and excluded later by the pooling head.
        """
        if video.dim() != 5:
            raise ValueError(f"video must be (B, F, 3, H, W), got shape {tuple(video.shape)}")
        b, f = video.shape[:2]
        if frame_mask is not None and frame_mask.shape != (b, f):
            raise ValueError(f"frame_mask must be (B, F) = {(b, f)}, got {tuple(frame_mask.shape)}")
        with context.frames(f, frame_mask):
            feats = self.clip.encode_image(video.flatten(0, 1))
        return feats.view(b, f, -1)

    def encode_visual(self, pixels: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images (B,3,H,W) or videos (B,F,3,H,W) -> per-frame features (B, F, D)."""
        if pixels.dim() == 4:
            return self.encode_image(pixels).unsqueeze(1)
        return self.encode_video(pixels, frame_mask)

    def forward(self, tokens: torch.Tensor, pixels: torch.Tensor, frame_mask: Optional[torch.Tensor] = None):
        return self.encode_text(tokens), self.encode_visual(pixels, frame_mask)

    @property
    def activation(self) -> str:
        """The MLP activation the towers run now: 'quick_gelu', 'gelu' or 'mixed'."""
        from xmodal.backbones.activation import activation_name

        return activation_name(self.clip)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, pretrained={self.weights_info['pretrained']!r}, activation={self.activation!r}"


def block_modules(model: DualEncoder) -> List[tuple]:
    """[(modality, index, block)] for both towers, vision first."""
    return [(m, i, b) for m in MODALITIES for i, b in enumerate(model.blocks(m))]
