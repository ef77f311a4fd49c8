"""Convpass (Jie & Deng, 2022): convolutional bypasses parallel to attention and MLP.

Each bypass takes the LayerNorm output feeding its branch, projects down (d -> 8),
applies QuickGELU, a 3x3 convolution over the patch grid (the CLS token goes through the
same convolution as a 1x1 map), QuickGELU, dropout, and projects up; the result, scaled by
`scale`, is added to the branch. The up-projection is zero-initialised and the conv starts
as identity at its centre tap, so training starts at the frozen model. Vision tower only;
video frames are adapted independently (2D), as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from xmodal.backbones.dual_encoder import VISION
from xmodal.methods.base import Method, MethodConfig, hook_block, patch_grid, register, select_layers


@dataclass
class ConvpassConfig(MethodConfig):
    method = "convpass"
    dim: int = 8
    #: output scale s; the paper tunes it per task
    scale: float = 0.1
    dropout: float = 0.1
    positions: str = "both"  # attn | ffn | both
    layers: object = "all"
    xavier_conv: bool = False  # False: identity-centred conv as in the official init


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ConvpassLayer(nn.Module):
    def __init__(self, width: int, dim: int, scale: float, dropout: float, xavier_conv: bool):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(width, dim)
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.up = nn.Linear(dim, width)
        self.act = QuickGELU()
        self.drop = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        if xavier_conv:
            nn.init.xavier_uniform_(self.conv.weight)
        else:
            nn.init.zeros_(self.conv.weight)
            with torch.no_grad():
                self.conv.weight[:, :, 1, 1] += torch.eye(dim)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_img, n, _ = x.shape
        side = patch_grid(n)
        z = self.act(self.down(x))
        c = z.shape[-1]
        patches = z[:, 1:].reshape(n_img, side, side, c).permute(0, 3, 1, 2)
        patches = self.conv(patches).permute(0, 2, 3, 1).reshape(n_img, side * side, c)
        cls = self.conv(z[:, :1].reshape(n_img, 1, 1, c).permute(0, 3, 1, 2)).reshape(n_img, 1, c)
        z = self.drop(self.act(torch.cat([cls, patches], dim=1)))
        return self.up(z) * self.scale


@register
class Convpass(Method):
    name = "convpass"
    config_class = ConvpassConfig

    def __init__(self, config: ConvpassConfig, backbone):
        super().__init__(config, backbone)
        width = backbone.width(VISION)
        self.positions = ["attn", "ffn"] if config.positions == "both" else [config.positions]
        self.layer_ids = select_layers(config.layers, backbone.num_layers(VISION))
        self.vision = nn.ModuleDict({
            str(i): nn.ModuleDict({
                p: ConvpassLayer(width, config.dim, config.scale, config.dropout, config.xavier_conv)
                for p in self.positions
            })
            for i in self.layer_ids
        })

    def attach(self, backbone) -> None:
        blocks = backbone.blocks(VISION)
        for i in self.layer_ids:
            for p in self.positions:
                self.add_handles(hook_block(blocks[i], p, self.vision[str(i)][p], form="parallel_normed"))
