"""MSTA: Multi-modal Spatio-Temporal Adapter (Chen et al., "Efficient Transfer Learning for
Video-language Foundation Models"). No official code exists; this follows the paper's text.

For each adapted block b (from `start` to the last):
    z      = GELU(x W_down^m)          per-modality down-projection  d_m -> r
    z      = z W_shared^b              ONE middle projection r -> r used by both towers
    delta  = lambda * (z W_up^m)       per-modality up-projection   r -> d_m
and for video the up-projection has a temporal branch: the up-projected tokens, laid out as
(frames, h, w) per clip, go through a depthwise 3D convolution (kernel `temporal_kernel`,
default (3,1,1): across neighbouring frames) whose output is added. The CLS token is a 1x1
grid. Up-projections and the conv start at zero, so training starts at the frozen model.

Consistency loss (`consistency_weight`, alpha=1 in the paper): when an item carries richer
`descriptions`, L_CC = sum_D (1 - cos(e_trainable(caption), e_frozen(D))), averaged over the
batch, pulls the adapted caption embedding toward the frozen model's embedding of each
description (the frozen branch is the backbone with the adapter detached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.backbones import context
from xmodal.backbones.dual_encoder import VISION
from xmodal.errors import XModalError
from xmodal.methods.base import Method, MethodConfig, hook_block, modalities_of, patch_grid, register, select_layers


@dataclass
class MSTAConfig(MethodConfig):
    method = "msta"
    r: int = 64
    scale: float = 1.0  # lambda
    #: first adapted block; "auto" = the top third of each tower
    start: object = "auto"
    position: str = "ffn"  # attn | ffn
    temporal_kernel: Tuple[int, int, int] = (3, 1, 1)
    modalities: str = "both"
    consistency_weight: float = 1.0


class TemporalUp(nn.Module):
    """Spatial linear up-projection plus a depthwise 3D conv over (frames, h, w), summed."""

    def __init__(self, r: int, width: int, kernel: Tuple[int, int, int]):
        super().__init__()
        if any(k % 2 == 0 for k in kernel):
            raise XModalError(f"msta.temporal_kernel={kernel}: sizes must be odd")
        self.up = nn.Linear(r, width)
        self.conv = nn.Conv3d(width, width, kernel, padding=tuple(k // 2 for k in kernel), groups=width)
        for t in (self.up.weight, self.up.bias, self.conv.weight, self.conv.bias):
            nn.init.zeros_(t)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = self.up(z)
        bf, n, d = u.shape
        f = context.num_frames()
        b = bf // f
        side = patch_grid(n)
        grid = u[:, 1:].reshape(b, f, side, side, d).permute(0, 4, 1, 2, 3)
        cls = u[:, :1].reshape(b, f, 1, 1, d).permute(0, 4, 1, 2, 3)
        t_grid = self.conv(grid).permute(0, 2, 3, 4, 1).reshape(bf, side * side, d)
        t_cls = self.conv(cls).permute(0, 2, 3, 4, 1).reshape(bf, 1, d)
        return u + torch.cat([t_cls, t_grid], dim=1)


class MSTALayer(nn.Module):
    def __init__(self, width: int, r: int, scale: float, temporal: Optional[Tuple[int, int, int]]):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(width, r)
        if temporal is None:
            self.up = nn.Linear(r, width)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            self.up = TemporalUp(r, width, temporal)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor, shared: nn.Linear) -> torch.Tensor:
        """`shared` is the middle projection this block shares with the other tower."""
        return self.up(shared(F.gelu(self.down(x)))) * self.scale


@register
class MSTA(Method):
    name = "msta"
    config_class = MSTAConfig

    def __init__(self, config: MSTAConfig, backbone):
        super().__init__(config, backbone)
        if config.position not in ("attn", "ffn"):
            raise XModalError(f"msta.position={config.position!r}: expected 'attn' or 'ffn'")
        self.mods = modalities_of(config.modalities)
        self.layer_ids = {m: self._layers(backbone.num_layers(m)) for m in self.mods}
        # one shared middle projection per adapted depth slot, aligned from the top of each tower
        depth = max(len(v) for v in self.layer_ids.values())
        self.shared = nn.ModuleList(nn.Linear(config.r, config.r) for _ in range(depth))
        for lin in self.shared:
            nn.init.eye_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.vision = nn.ModuleDict()
        self.text = nn.ModuleDict()
        for m in self.mods:
            temporal = tuple(config.temporal_kernel) if m == VISION else None
            target = self.vision if m == VISION else self.text
            for i in self.layer_ids[m]:
                target[str(i)] = MSTALayer(backbone.width(m), config.r, config.scale, temporal)

    def _layers(self, n: int):
        start = self.config.start
        first = n - max(1, round(n / 3)) if start == "auto" else int(start)
        if not 0 <= first < n:
            raise XModalError(f"msta.start={start!r}: expected 'auto' or a block index in [0, {n})")
        return select_layers(f"{first}:", n, "msta.start")

    def _slot(self, modality: str, index: int) -> int:
        ids = self.layer_ids[modality]
        # align the towers' top blocks: the last adapted block of each uses the last slot
        return len(self.shared) - len(ids) + ids.index(index)

    def attach(self, backbone) -> None:
        for m in self.mods:
            layers = self.vision if m == VISION else self.text
            blocks = backbone.blocks(m)
            for i in self.layer_ids[m]:
                layer = layers[str(i)]
                shared = self.shared[self._slot(m, i)]
                fn = lambda x, layer=layer, shared=shared: layer(x, shared)  # noqa: E731
                self.add_handles(hook_block(blocks[i], self.config.position, fn))

    def extra_loss(self, model, batch: Dict[str, Any], outputs: Dict[str, Any]) -> Optional[torch.Tensor]:
        """L_CC against the frozen branch's embeddings of the items' richer descriptions."""
        if self.config.consistency_weight == 0 or batch.get("desc_tokens") is None:
            return None
        desc, mask = batch["desc_tokens"], batch["desc_mask"].bool()
        if not mask.any():
            return None
        b, k, length = desc.shape
        with torch.no_grad(), model.disable_adapters():
            frozen = model.backbone.encode_text(desc[mask])
        text = outputs["text"]  # the engine's outputs: text, frames, frame_mask, loss, head
        row = torch.arange(b, device=desc.device).unsqueeze(1).expand(b, k)[mask]
        cos = F.cosine_similarity(text[row].float(), frozen.float(), dim=-1)
        per_item = torch.zeros(b, device=text.device).index_add_(0, row, 1 - cos)
        return self.config.consistency_weight * per_item.mean()

