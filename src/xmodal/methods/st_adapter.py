"""ST-Adapter (Pan et al., NeurIPS 2022): spatio-temporal adapters for image-to-video transfer.

Before every selected vision block, patch tokens go through down-projection ->
depthwise 3D convolution over (frames, h, w) -> up-projection, added back residually; the
CLS token passes through untouched. The convolution is zero-initialised (so is the delta),
which makes the adapted model start exactly at the frozen one. Video-only: the text tower
stays frozen. Images are one-frame clips (the temporal kernel then sees zero padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn

from xmodal.backbones import context
from xmodal.backbones.dual_encoder import VISION
from xmodal.methods.base import Method, MethodConfig, hook_block_input, patch_grid, register, select_layers


@dataclass
class STAdapterConfig(MethodConfig):
    method = "st_adapter"
    #: bottleneck channels; None = half the vision width (384 for ViT-B, the paper's setting)
    channels: Optional[int] = None
    kernel: Tuple[int, int, int] = (3, 1, 1)  # (time, h, w); the paper's default is temporal-only
    layers: object = "all"


class STAdapterLayer(nn.Module):
    """down -> depthwise Conv3d over (F, h, w) -> up, on patch tokens only."""

    def __init__(self, width: int, channels: int, kernel: Tuple[int, int, int]):
        super().__init__()
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"kernel {kernel}: sizes must be odd so the grid keeps its shape")
        self.down = nn.Linear(width, channels)
        self.conv = nn.Conv3d(channels, channels, kernel, padding=tuple(k // 2 for k in kernel), groups=channels)
        self.up = nn.Linear(channels, width)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bf, n, _ = x.shape
        f = context.num_frames()
        b = bf // f
        side = patch_grid(n)
        z = self.down(x[:, 1:])  # (B*F, h*w, C)
        c = z.shape[-1]
        z = z.view(b, f, side, side, c).permute(0, 4, 1, 2, 3)  # (B, C, F, h, w)
        z = self.conv(z).permute(0, 2, 3, 4, 1).reshape(bf, side * side, c)
        delta = self.up(z)
        return torch.cat([delta.new_zeros(bf, 1, delta.shape[-1]), delta], dim=1)


@register
class STAdapter(Method):
    name = "st_adapter"
    config_class = STAdapterConfig

    def __init__(self, config: STAdapterConfig, backbone):
        super().__init__(config, backbone)
        width = backbone.width(VISION)
        channels = config.channels or width // 2
        self.layer_ids = select_layers(config.layers, backbone.num_layers(VISION))
        self.vision = nn.ModuleDict(
            {str(i): STAdapterLayer(width, channels, tuple(config.kernel)) for i in self.layer_ids}
        )

    def attach(self, backbone) -> None:
        blocks = backbone.blocks(VISION)
        for i in self.layer_ids:
            self.add_handles(hook_block_input(blocks[i], self.vision[str(i)]))
