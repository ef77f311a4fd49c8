"""Cross-Modal Adapter (Jiang et al., "Cross-Modal Adapter for Vision-Language Retrieval").

Bottleneck adapters in both towers whose up-projection is partly ONE tensor shared by the
vision and the text encoder, so each tower's training signal shapes the other's adapter
(encoder-level implicit cross-modal interaction):

    z          = GELU_tanh(x W_down + b_down)                       per tower, r wide
    Adapter(x) = x + Concat[z W_up,unique + b_unique , z W_up,share + b_share]

`W_up,share` (r x d_s, bias d_s) is one tensor per (block slot, position), registered once
as `shared.<slot>.<attn|ffn>.up.{weight,bias}` and used by both towers; its output is the
LAST d_s channels of the delta (the layout of the official code, `cat([unique, share])`).
`W_down` and `W_up,unique` (r x (d - d_s)) are per tower (`vision.<i>.<pos>.{down,up}.*`).
The towers may differ in width (ViT-B: 768 vision vs 512 text): sharing happens in the
r -> d_s output slice, which both towers have, so only d_s <= min(widths) is required.

Ablation axes of the paper, all config fields:
- `d_s` (0: no sharing = uni-modal adapters), `r`, `scale`, `dropout`, `activation`.
- `positions` "attn" | "ffn" | "both" (after attention / after the MLP), `form`
  "sequential" (on the branch output, the paper's) | "parallel" (on the block input).
- `layers`, `uni_layers`: which blocks get an adapter, and which of them get a uni-modal
  (non-shared, full-width) adapter instead, mixing CM and uni adapters by layer; blocks in
  `uni_layers` are adapted even if `layers` leaves them out. A dict {"vision": spec,
  "text": spec} gives one spec per tower.
- `modalities` "vision" | "text" | "both".
- `share` "up" (paper) | "down" | "both". Sharing the down-projection can only share weights
  acting on a subspace both towers have: the last d_s INPUT channels, i.e.
  W_down = Concat[W_down,unique ((d - d_s) x r) ; W_down,share (d_s x r)] with the shared
  block stored as `shared.<slot>.<pos>.down.weight` (r x d_s); b_down stays per tower.
- `layer_map` for towers of different depth (ViT-L/14: 24 vision vs 12 text blocks): there
  are min(depths) shared slots; block i of a deeper tower uses slot
  `map_layer(i, depth, slots, layer_map)`: "proportional" (two vision blocks per slot on
  ViT-L) or "top" (last blocks aligned; lower blocks, which map to no slot, get a uni-modal
  adapter).
- `init` "zero_up" (default: down ~ N(0, init_std) truncated at 2 std, all up-projections zero, so
  the adapted model starts exactly at the frozen one) | "normal" (every weight ~ N(0, init_std),
  std 0.01, drawn as the official code's trunc_normal_(std=0.01), whose +-2 bounds are absolute,
  i.e. effectively untruncated; not identity at init) | "lora".
- `activation` "gelu_tanh" (default; "gelu_new" of the official adapter module, the paper's
  "GELU approximation") | "quick_gelu" (x * sigmoid(1.702 x): what the official training script
  requires, since its CLIP runs QuickGELU) | "gelu" | "relu" | "silu".

Defaults are the paper's: r=8, d_s=16, sequential after attention and after the MLP of
every block of both encoders. On ViT-B/32 that is 519,168 trainable parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from torch import nn

from xmodal.backbones.dual_encoder import MODALITIES, DualEncoder
from xmodal.errors import XModalError
from xmodal.methods.base import LayerSpec, MethodConfig, map_layer, modalities_of, register
from xmodal.methods.bottleneck import (
    FORMS, Bottleneck, BottleneckAdapterMethod, SharedSlice, Site, check_bottleneck_fields, check_choice,
    layers_for, positions_of,
)

SHARE = ("up", "down", "both")
LAYER_MAPS = ("proportional", "top")


@dataclass
class CrossModalAdapterConfig(MethodConfig):
    method = "cross_modal_adapter"

    r: int = 8
    d_s: int = 16
    share: str = "up"
    positions: str = "both"
    form: str = "sequential"
    layers: LayerSpec = "all"
    uni_layers: LayerSpec = "none"
    modalities: str = "both"
    layer_map: str = "proportional"
    activation: str = "gelu_tanh"
    scale: float = 1.0
    dropout: float = 0.0
    init: str = "zero_up"
    init_std: float = 0.01

    def __post_init__(self):
        name = self.method
        check_bottleneck_fields(name, self)
        if not isinstance(self.d_s, int) or isinstance(self.d_s, bool) or self.d_s < 0:
            raise XModalError(f"{name}: field 'd_s' must be an integer >= 0 (0 = no sharing), got {self.d_s!r}")
        check_choice(name, "share", self.share, SHARE)
        check_choice(name, "form", self.form, FORMS)
        check_choice(name, "layer_map", self.layer_map, LAYER_MAPS)
        positions_of(name, self.positions)


@register
class CrossModalAdapter(BottleneckAdapterMethod):
    name = "cross_modal_adapter"
    config_class = CrossModalAdapterConfig

    def __init__(self, config: CrossModalAdapterConfig, backbone: DualEncoder):
        super().__init__(config, backbone)  # calls plan_sites, then make_bottleneck per site
        shared = nn.ModuleDict()
        share_up = config.share in ("up", "both")
        share_down = config.share in ("down", "both")
        for site in self.sites:
            slot = self.site_slot[site]
            if slot is None:
                continue
            position = site[2]
            if str(slot) not in shared:
                shared[str(slot)] = nn.ModuleDict()
            if position not in shared[str(slot)]:
                piece = SharedSlice(config.r, config.d_s, share_up=share_up, share_down=share_down)
                piece.reset_parameters(config.init, config.init_std)
                shared[str(slot)][position] = piece
        if len(shared):
            self.shared = shared

    # -- structure
    def plan_sites(self, backbone: DualEncoder) -> List[Site]:
        cfg = self.config
        depths = {m: backbone.num_layers(m) for m in MODALITIES}
        self.num_slots = min(depths.values())
        positions = positions_of(self.name, cfg.positions)
        sites: List[Site] = []
        self.site_slot: Dict[Site, Optional[int]] = {}
        for m in modalities_of(cfg.modalities):
            uni = set(layers_for(cfg.uni_layers, m, depths[m], "uni_layers"))
            chosen = sorted(set(layers_for(cfg.layers, m, depths[m])) | uni)
            for i in chosen:
                slot = None
                if cfg.d_s > 0 and i not in uni:
                    slot = map_layer(i, depths[m], self.num_slots, cfg.layer_map)
                for p in positions:
                    sites.append((m, i, p))
                    self.site_slot[(m, i, p)] = slot
            if cfg.d_s > 0 and any(self.site_slot[s] is not None for s in sites if s[0] == m):
                width = backbone.width(m)
                if cfg.d_s > width:
                    raise XModalError(
                        f"{self.name}: field 'd_s'={cfg.d_s} exceeds the {m} tower's width {width}; "
                        f"d_s must be in [0, {width}]"
                    )
        return sites

    def make_bottleneck(self, modality: str, index: int, position: str, width: int) -> Bottleneck:
        cfg = self.config
        shares = self.site_slot[(modality, index, position)] is not None
        return Bottleneck(
            width,
            cfg.r,
            shared_in=cfg.d_s if shares and cfg.share in ("down", "both") else 0,
            shared_out=cfg.d_s if shares and cfg.share in ("up", "both") else 0,
            activation=cfg.activation,
            dropout=cfg.dropout,
            scale=cfg.scale,
            init=cfg.init,
            init_std=cfg.init_std,
        )

    def form(self) -> str:
        return self.config.form

    def slot_of(self, modality: str, index: int, position: str) -> Optional[int]:
        """The shared slot a site uses; None for uni-modal adapters (and d_s = 0)."""
        return self.site_slot[(modality, index, position)]

    def site_shared(self, modality: str, index: int, position: str) -> Optional[SharedSlice]:
        slot = self.slot_of(modality, index, position)
        return None if slot is None else self.shared[str(slot)][position]
