"""MSTA: Multi-modal Spatio-Temporal Adapter (Chen et al., "Efficient Transfer Learning for
Video-language Foundation Models"). No official code; this follows the paper's text and the
authors' released training logs. Where xmodal still differs: docs/methods/msta.md.

Placement (`position="block"`, the paper's): the adapter runs PARALLEL TO THE WHOLE BLOCK and
reads the block's input,  [c_j, x_j] = E_j([c_{j-1}, x_{j-1}]) + lambda * A_j([c_{j-1}, x_{j-1}]).
`position="attn"|"ffn"` keeps the earlier sequential form (A on that branch's output).

A_j, per adapted block j (from `start` to the last):
    z     = GELU(x W_down^m)        per-modality down-projection  d_m -> r
    z     = z W_shared^j            ONE middle projection r -> r used by both towers (`shared`)
    A(x)  = z W_up^m                per-modality up-projection   r -> d_m
For video the up-projection is "a spatial up-projection W_ku-s (a linear layer) and a temporal
up-projection W_ku-t (a 3D convolutional layer), with their outputs added"; `temporal`:
- "depthwise" (default): the 3D conv is depthwise with kernel `temporal_kernel` (3,1,1) over the
  spatial branch's output laid out as (frames, h, w). This layout reproduces the paper's 8.7M at
  r=256 over 12 blocks (8,712,192 on ViT-B), so it is the one the budget describes.
- "conv3d": the literal reading, a full r -> d_m 3D conv from the bottleneck; it adds
  3 r d_m per block and nearly doubles the budget (15.8M at r=256), so it is an option.
- "none": no temporal branch (the paper's spatial-only ablation).
The CLS token is a 1x1 grid of its own. Images are one frame.

Initialisation (`init`): "kaiming" (default) draws W_down and W_shared Kaiming-normal (fan_in) as
the paper says and starts the up-projections (spatial linear and temporal conv) at ZERO, so
lambda * A = 0 and training starts at the frozen model (lambda itself is not zero). "kaiming_all"
draws the up-projections Kaiming too (the literal text; not identity at init).

Defaults are the authors' logs: r=128 on blocks 8-12 of 12 (`start="auto"` = the top 5/12 of
each tower), lambda=0.005: 1,744,000 parameters on ViT-B. Preset "paper" is the paper's 8.7M
(r=256, every block). `make_config("msta", preset="paper")`.

Consistency loss L_CC (alpha = `consistency_weight`, 1.0 in the paper):
    L_CC = alpha * (2 - cos(w, D_spatial) - cos(w, D_temporal))
w is the adapted caption embedding, D_kind the mean of the frozen model's (adapter detached)
L2-normalised embeddings of the item's descriptions of that kind. Each term is averaged over the
items that HAVE descriptions of that kind; items without any add nothing (they do not dilute the
mean). Descriptions of kind "generic" (own data without kinds, or a batch without `desc_kind`)
form one more term of the same shape, 1 - cos(w, D_generic).
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

POSITIONS = ("block", "attn", "ffn")
TEMPORAL = ("depthwise", "conv3d", "none")
INITS = ("kaiming", "kaiming_all")
#: batch["desc_kind"] codes (data side contract)
SPATIAL, TEMPORAL_KIND, GENERIC, PAD = 0, 1, 2, -1
KIND_NAMES = {SPATIAL: "spatial", TEMPORAL_KIND: "temporal", GENERIC: "generic"}


@dataclass
class MSTAConfig(MethodConfig):
    method = "msta"
    r: int = 128
    scale: float = 0.005  # lambda
    #: first adapted block (0-based); "auto" = the top 5/12 of each tower (blocks 8-12 of 12)
    start: object = "auto"
    position: str = "block"  # block (paper) | attn | ffn (sequential after that branch)
    temporal: str = "depthwise"  # depthwise | conv3d | none
    temporal_kernel: Tuple[int, int, int] = (3, 1, 1)
    #: the middle projection shared by both towers (False: the no-sharing ablation)
    shared: bool = True
    init: str = "kaiming"  # kaiming (up = 0, identity at init) | kaiming_all
    modalities: str = "both"
    consistency_weight: float = 1.0  # alpha

    @classmethod
    def from_dict(cls, data, source: str = "config"):
        data = dict(data)
        if "shared" not in data and "position" in data and data.get("start") == "auto":
            # an adapter saved before the paper pass: its "auto" meant the top third of each tower
            data["start"] = "auto_third"
        return super().from_dict(data, source)

    def __post_init__(self):
        for name, value, choices in (("position", self.position, POSITIONS), ("temporal", self.temporal, TEMPORAL),
                                     ("init", self.init, INITS)):
            if value not in choices:
                raise XModalError(f"msta: field {name!r} must be one of {list(choices)}, got {value!r}")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise XModalError(f"msta: field 'r' must be a positive integer, got {self.r!r}")
        kernel = tuple(self.temporal_kernel)
        if len(kernel) != 3 or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernel):
            raise XModalError(f"msta: field 'temporal_kernel' must be three odd positive sizes, got {self.temporal_kernel!r}")
        modalities_of(self.modalities)


def _kaiming(weight: torch.Tensor) -> None:
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="linear")


def _as_grids(u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(B*F, 1+h*w, C) -> CLS (B, C, F, 1, 1) and patches (B, C, F, h, w), and h."""
    bf, n, c = u.shape
    f = context.num_frames()
    b = bf // f
    side = patch_grid(n)
    grid = u[:, 1:].reshape(b, f, side, side, c).permute(0, 4, 1, 2, 3)
    cls = u[:, :1].reshape(b, f, 1, 1, c).permute(0, 4, 1, 2, 3)
    return cls, grid, side


def _from_grids(cls: torch.Tensor, grid: torch.Tensor, side: int) -> torch.Tensor:
    b, d, f = grid.shape[:3]
    t_grid = grid.permute(0, 2, 3, 4, 1).reshape(b * f, side * side, d)
    t_cls = cls.permute(0, 2, 3, 4, 1).reshape(b * f, 1, d)
    return torch.cat([t_cls, t_grid], dim=1)


class TemporalUp(nn.Module):
    """W_ku-s (linear r -> d) plus W_ku-t (a 3D conv over (frames, h, w)), outputs added.

    mode "depthwise": W_ku-t is a depthwise conv on W_ku-s's output (d groups);
    mode "conv3d": W_ku-t is a full r -> d conv on the bottleneck itself.
    """

    def __init__(self, r: int, width: int, kernel: Tuple[int, int, int], mode: str):
        super().__init__()
        self.mode = mode
        pad = tuple(k // 2 for k in kernel)
        self.up = nn.Linear(r, width)
        if mode == "depthwise":
            self.conv = nn.Conv3d(width, width, kernel, padding=pad, groups=width)
        else:
            self.conv = nn.Conv3d(r, width, kernel, padding=pad)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        u = self.up(z)
        cls, grid, side = _as_grids(u if self.mode == "depthwise" else z)
        return u + _from_grids(self.conv(cls), self.conv(grid), side)


class MSTALayer(nn.Module):
    """lambda * up(shared(GELU(down(x)))) for one block of one tower."""

    def __init__(self, width: int, r: int, scale: float, temporal: Optional[str], kernel, init: str):
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(width, r)
        self.up = nn.Linear(r, width) if temporal in (None, "none") else TemporalUp(r, width, kernel, temporal)
        _kaiming(self.down.weight)
        nn.init.zeros_(self.down.bias)
        for mod in self.up.modules():
            if isinstance(mod, (nn.Linear, nn.Conv3d)):
                if init == "kaiming_all":
                    _kaiming(mod.weight)
                else:
                    nn.init.zeros_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor, shared: Optional[nn.Linear]) -> torch.Tensor:
        """`shared` is the middle projection this block shares with the other tower."""
        z = F.gelu(self.down(x))
        if shared is not None:
            z = shared(z)
        return self.up(z) * self.scale


@register
class MSTA(Method):
    name = "msta"
    config_class = MSTAConfig
    paper_denominator = "backbone_without_token_embedding"

    def __init__(self, config: MSTAConfig, backbone):
        super().__init__(config, backbone)
        self.mods = modalities_of(config.modalities)
        self.layer_ids = {m: self._layers(backbone.num_layers(m)) for m in self.mods}
        # one shared middle projection per adapted depth slot, aligned from the top of each tower
        if config.shared:
            depth = max(len(v) for v in self.layer_ids.values())
            self.shared = nn.ModuleList(nn.Linear(config.r, config.r) for _ in range(depth))
            for lin in self.shared:
                _kaiming(lin.weight)
                nn.init.zeros_(lin.bias)
        self.vision = nn.ModuleDict()
        self.text = nn.ModuleDict()
        for m in self.mods:
            temporal = config.temporal if m == VISION else None
            target = self.vision if m == VISION else self.text
            for i in self.layer_ids[m]:
                target[str(i)] = MSTALayer(backbone.width(m), config.r, config.scale, temporal,
                                           tuple(config.temporal_kernel), config.init)

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return self.config.init == "kaiming"

    def _layers(self, n: int):
        start = self.config.start
        if start in ("auto", "auto_third"):  # top 5/12 (blocks 8-12 of 12); auto_third: older checkpoints
            first = n - max(1, round(n * (5 / 12 if start == "auto" else 1 / 3)))
        else:
            first = start
        if not isinstance(first, int) or isinstance(first, bool) or not 0 <= first < n:
            raise XModalError(f"msta.start={start!r}: expected 'auto' or a block index in [0, {n})")
        return select_layers(f"{first}:", n, "msta.start")

    def _slot(self, modality: str, index: int) -> int:
        ids = self.layer_ids[modality]
        # align the towers' top blocks: the last adapted block of each uses the last slot
        return len(self.shared) - len(ids) + ids.index(index)

    def attach(self, backbone) -> None:
        form = "block_parallel" if self.config.position == "block" else "sequential"
        for m in self.mods:
            layers = self.vision if m == VISION else self.text
            blocks = backbone.blocks(m)
            for i in self.layer_ids[m]:
                layer = layers[str(i)]
                shared = self.shared[self._slot(m, i)] if self.config.shared else None
                fn = lambda x, layer=layer, shared=shared: layer(x, shared)  # noqa: E731
                self.add_handles(hook_block(blocks[i], self.config.position, fn, form=form))

    def extra_loss(self, model, batch: Dict[str, Any], outputs: Dict[str, Any]) -> Optional[torch.Tensor]:
        """L_CC against the frozen branch's embeddings of the items' descriptions (see module doc)."""
        terms = self.consistency_terms(model, batch, outputs["text"])
        if not terms:
            return None
        return self.config.consistency_weight * sum(terms.values())

    def consistency_terms(self, model, batch: Dict[str, Any], text: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{"spatial": mean over items with spatial descriptions of 1 - cos(w, D_spatial), ...}."""
        if self.config.consistency_weight == 0 or batch.get("desc_tokens") is None:
            return {}
        desc, mask = batch["desc_tokens"], batch["desc_mask"].bool()
        kind = batch.get("desc_kind")
        if kind is None:  # batches from before description kinds: all generic
            kind = torch.full(mask.shape, GENERIC, dtype=torch.long, device=mask.device)
        kind = kind.to(mask.device)
        if kind.shape != mask.shape:
            raise XModalError(f"msta: batch desc_kind has shape {tuple(kind.shape)}, desc_mask {tuple(mask.shape)}")
        mask = mask & (kind >= 0)
        if not mask.any():
            return {}
        with torch.no_grad(), model.disable_adapters():
            frozen = F.normalize(model.backbone.encode_text(desc[mask]).float(), dim=-1)
        emb = frozen.new_zeros(*mask.shape, frozen.shape[-1])
        emb[mask] = frozen
        terms = {}
        for code, label in KIND_NAMES.items():
            sel = mask & (kind == code)
            has = sel.any(dim=1)
            if not has.any():
                continue
            mean = (emb * sel.unsqueeze(-1)).sum(1)[has] / sel.sum(1)[has].unsqueeze(-1)
            cos = F.cosine_similarity(text[has].float(), mean, dim=-1)
            terms[label] = (1 - cos).mean()
        return terms


