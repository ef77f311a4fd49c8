"""MV-Adapter (Zhang et al., CVPR 2024, "MV-Adapter: Multimodal Video Transfer Learning").

A bottleneck after the MLP of each selected block of both towers, output scaled by s=0.1.

Video branch (temporal adaptation, TA): after the down-projection d -> d', each clip's
sequence [CC token, CLS_1..CLS_F, P_1..P_F] (P_i = frame i's mean patch token), with learned
temporal position embeddings, goes through one light transformer block over time (2 heads).
Frame i's CLS token is replaced by its output. Patch tokens go down -> activation -> up with
no temporal information (paper Alg. 1 and the official code); `patch_temporal=True` keeps the
earlier variant where every patch token also receives the block's update of P_i. A calibration MLP (2d' -> d'/sigma -> d', ReLU, sigma=4) on concat(CC, CLS_i + P_i) gives a
per-frame alpha_i that rescales the up-projection for frame i's CLS token
(W_up,i = diag(alpha_i) W_up, alpha = 1 + MLP(.) so calibration starts neutral); patch tokens
use the plain up-projection. Padded frames are masked out of the temporal attention.

Text branch: the same bottleneck with a light causal transformer block (as the text tower).

Cross Modality Tying (CMT): in the tied blocks (default the last 2) one shared factor f_C
(dim 32) per block and a modality-specific projection M_S give beta = f_C M_S, which rescales
one projection of each modality, W <- W * (1 + beta), along one of its axes (`cmt_mode`, the
rows of the paper's Tab. 7):
- "down_in" (default; the Tab. 7 row equal to the main results): W_down per input channel, beta in R^d_m;
- "down_out": W_down per output channel, beta in R^d' (xmodal's earlier default);
- "up_in": W_up per input channel, beta in R^d';  "up_out": W_up per output channel, beta in R^d_m.
("output"/"input" of older configs read as down_out/down_in.) M_S starts at zero.

Up-projections and the calibration output are zero-initialised, so training starts at the
frozen model. Ablations: temporal = "none" | "no_calibration" | "full"; cmt on/off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.backbones import context
from xmodal.backbones.dual_encoder import VISION
from xmodal.errors import XModalError
from xmodal.methods.base import Method, MethodConfig, hook_block, modalities_of, register, select_layers


CMT_MODES = ("down_in", "down_out", "up_in", "up_out")
CMT_ALIASES = {"output": "down_out", "input": "down_in"}


@dataclass
class MVAdapterConfig(MethodConfig):
    method = "mv_adapter"
    #: bottleneck d'; None = 64, or 128 for towers 1024 wide (ViT-L), as in the paper
    bottleneck: Optional[int] = None
    scale: float = 0.1
    layers: object = "all"
    modalities: str = "both"
    heads: int = 2
    temporal: str = "full"  # none | no_calibration | full
    calibration_ratio: int = 4  # sigma
    max_frames: int = 64
    text_temporal: bool = True
    cmt: bool = True
    cmt_layers: object = "last:2"
    cmt_dim: int = 32
    cmt_mode: str = "down_in"  # down_in | down_out | up_in | up_out (which projection and axis beta rescales)
    #: also give patch tokens the temporal block's update of their frame (not in the paper)
    patch_temporal: bool = False

    @classmethod
    def from_dict(cls, data, source: str = "config"):
        data = dict(data)
        if "patch_temporal" not in data and data.get("cmt_mode") in CMT_ALIASES:
            # saved before patch_temporal existed (cmt_mode was "output"/"input" then): those
            # adapters were trained with the temporal update on patch tokens; keep it
            data["patch_temporal"] = True
        return super().from_dict(data, source)

    def __post_init__(self):
        self.cmt_mode = CMT_ALIASES.get(self.cmt_mode, self.cmt_mode)
        if self.cmt_mode not in CMT_MODES:
            raise XModalError(f"mv_adapter.cmt_mode={self.cmt_mode!r}: expected one of {list(CMT_MODES)}")


class LightBlock(nn.Module):
    """A pre-LN transformer block of width d' (the 'light transformer')."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = None
        if self.causal:
            n = x.shape[1]
            mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask, key_padding_mask=key_padding_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TiedScale(nn.Module):
    """M_S of Cross Modality Tying: beta = f_C M_S for one modality in one tied block."""

    def __init__(self, cmt_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cmt_dim, channels, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, factor: torch.Tensor) -> torch.Tensor:
        return 1 + self.proj(factor)


class MVBottleneck(nn.Module):
    """down (optionally CMT-rescaled) -> GELU -> [temporal/causal light block] -> up."""

    def __init__(self, width: int, d: int, scale: float):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(width, d)
        self.up = nn.Linear(d, width)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.tie: Optional[TiedScale] = None
        self.tie_mode = "down_in"

    def _tied(self, linear: nn.Linear, which: str, factor: Optional[torch.Tensor]) -> torch.Tensor:
        """linear.weight, rescaled by 1 + beta along the axis `tie_mode` names if it ties `which`."""
        w = linear.weight
        if self.tie is None or not self.tie_mode.startswith(which):
            return w
        beta = self.tie(factor)
        return w * (beta[:, None] if self.tie_mode.endswith("_out") else beta[None, :])

    def project_down(self, x: torch.Tensor, factor: Optional[torch.Tensor]) -> torch.Tensor:
        return F.gelu(F.linear(x, self._tied(self.down, "down", factor), self.down.bias))

    def project_up(self, z: torch.Tensor, factor: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(z, self._tied(self.up, "up", factor), self.up.bias)


class VideoAdapter(MVBottleneck):
    def __init__(self, width: int, d: int, cfg: MVAdapterConfig):
        super().__init__(width, d, cfg.scale)
        self.mode = cfg.temporal
        self.patch_temporal = cfg.patch_temporal
        if self.mode not in ("none", "no_calibration", "full"):
            raise XModalError(f"mv_adapter.temporal={cfg.temporal!r}: expected none, no_calibration or full")
        if self.mode != "none":
            self.cc = nn.Parameter(torch.randn(d) * 0.02)
            self.pos = nn.Parameter(torch.randn(cfg.max_frames, d) * 0.02)
            self.block = LightBlock(d, cfg.heads)
        if self.mode == "full":
            hidden = max(1, d // cfg.calibration_ratio)
            self.calibration = nn.Sequential(nn.Linear(2 * d, hidden), nn.ReLU(), nn.Linear(hidden, d))
            nn.init.zeros_(self.calibration[2].weight)
            nn.init.zeros_(self.calibration[2].bias)

    def forward(self, x: torch.Tensor, factor: Optional[torch.Tensor]) -> torch.Tensor:
        z = self.project_down(x, factor)
        if self.mode == "none":
            return self.project_up(z, factor) * self.scale
        ctx = context.visual_context()
        bf, n, d = z.shape
        f = ctx.num_frames
        b = bf // f
        if f > self.pos.shape[0]:
            raise XModalError(f"mv_adapter.max_frames={self.pos.shape[0]} < {f} frames in this batch")
        cls = z[:, 0].reshape(b, f, d)
        patch = z[:, 1:].mean(1).reshape(b, f, d)
        pos = self.pos[:f].to(z.dtype)
        seq = torch.cat([self.cc.to(z.dtype).expand(b, 1, d), cls + pos, patch + pos], dim=1)
        pad = None
        if ctx.frame_mask is not None:
            missing = ~ctx.frame_mask.to(z.device).bool()
            pad = torch.cat([missing.new_zeros(b, 1), missing, missing], dim=1)
        out = self.block(seq, key_padding_mask=pad)
        cc_o, cls_o, patch_o = out[:, :1], out[:, 1:1 + f], out[:, 1 + f:]
        if self.mode == "full":
            alpha = 1 + self.calibration(torch.cat([cc_o.expand(b, f, d), cls_o + patch_o], dim=-1))
            cls_in = cls_o * alpha
        else:
            cls_in = cls_o
        patches = z[:, 1:]
        if self.patch_temporal:
            patches = patches + (patch_o - patch).reshape(bf, 1, d)
        delta = torch.cat([self.project_up(cls_in.reshape(bf, 1, d), factor), self.project_up(patches, factor)], dim=1)
        return delta * self.scale


class TextAdapter(MVBottleneck):
    def __init__(self, width: int, d: int, cfg: MVAdapterConfig):
        super().__init__(width, d, cfg.scale)
        self.block = LightBlock(d, cfg.heads, causal=True) if cfg.text_temporal else None

    def forward(self, x: torch.Tensor, factor: Optional[torch.Tensor]) -> torch.Tensor:
        z = self.project_down(x, factor)
        if self.block is not None:
            z = self.block(z)
        return self.project_up(z, factor) * self.scale


@register
class MVAdapter(Method):
    name = "mv_adapter"
    config_class = MVAdapterConfig

    def __init__(self, config: MVAdapterConfig, backbone):
        super().__init__(config, backbone)
        d = config.bottleneck or (128 if backbone.width(VISION) >= 1024 else 64)
        self.mods = modalities_of(config.modalities)
        self.layer_ids = {m: select_layers(config.layers, backbone.num_layers(m)) for m in self.mods}
        self.vision = nn.ModuleDict()
        self.text = nn.ModuleDict()
        for m in self.mods:
            cls, target = (VideoAdapter, self.vision) if m == VISION else (TextAdapter, self.text)
            for i in self.layer_ids[m]:
                target[str(i)] = cls(backbone.width(m), d, config)
        # Cross Modality Tying: slot j ties the j-th tied block of each tower (aligned by order)
        self.tied = {m: [] for m in self.mods}
        self.factors = nn.ParameterList()
        if config.cmt and len(self.mods) == 2:
            tied = {m: [i for i in select_layers(config.cmt_layers, backbone.num_layers(m), "mv_adapter.cmt_layers")
                        if i in self.layer_ids[m]] for m in self.mods}
            slots = min(len(t) for t in tied.values())
            self.tied = {m: t[len(t) - slots:] for m, t in tied.items()}
            self.factors.extend(nn.Parameter(torch.randn(config.cmt_dim) * 0.1) for _ in range(slots))
            for m in self.mods:
                adapters = self.vision if m == VISION else self.text
                for i in self.tied[m]:
                    adapter = adapters[str(i)]
                    per_bottleneck = config.cmt_mode in ("down_out", "up_in")
                    channels = d if per_bottleneck else backbone.width(m)
                    adapter.tie = TiedScale(config.cmt_dim, channels)
                    adapter.tie_mode = config.cmt_mode

    def _factor(self, modality: str, index: int) -> Optional[torch.Tensor]:
        tied = self.tied.get(modality, [])
        return self.factors[tied.index(index)] if index in tied else None

    def attach(self, backbone) -> None:
        for m in self.mods:
            adapters = self.vision if m == VISION else self.text
            blocks = backbone.blocks(m)
            for i in self.layer_ids[m]:
                adapter, factor_of = adapters[str(i)], (lambda m=m, i=i: self._factor(m, i))
                fn = lambda x, a=adapter, g=factor_of: a(x, g())  # noqa: E731
                self.add_handles(hook_block(blocks[i], "ffn", fn))
