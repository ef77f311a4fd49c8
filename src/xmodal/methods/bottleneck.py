"""The bottleneck adapter layer shared by the adapter family, and where such layers go.

One `Bottleneck` computes the DELTA that `hook_block` adds to a residual branch:

    delta = scale * up(dropout(act(down(LN?(x)))))

The Cross-Modal Adapter needs part of `down`/`up` to be one tensor used by both towers.
Those slices live in a `SharedSlice` owned elsewhere (registered once under `shared.*`) and
are passed to `Bottleneck.forward` at call time, so the shared tensor is never registered
twice and gradients from both towers accumulate in it:

    up   = Concat[up_unique (d - d_s outputs) ; up_shared (last d_s outputs)]
    down = x[:, :d - d_s] W_down_unique + x[:, d - d_s:] W_down_shared + b_down

`BottleneckAdapterMethod` is the common base of the adapter methods: one bottleneck per
(modality, block, position) site, registered as `<modality>.<block>.<position>.{down,up}.*`
(these names are the safetensors keys of the adapter checkpoint).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from xmodal.backbones.dual_encoder import DualEncoder
from xmodal.errors import XModalError
from xmodal.methods.base import LayerSpec, Method, hook_block, modalities_of, select_layers
from xmodal.methods import fused

ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),  # "gelu_new" of the official CMA code
    "gelu": F.gelu,
    # x * sigmoid(1.702 x): what the official CMA training script requires (its CLIP uses QuickGELU);
    # the paper's text only says "a GELU approximation"
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
}

#: zero_up: down ~ truncated normal(init_std), up = 0 -> the adapted model starts at the frozen one.
#: lora:    down ~ kaiming uniform (a=sqrt(5)), up = 0 (AdaptFormer / He et al. code), also identity.
#: normal:  down and up ~ N(0, init_std), truncated at +-2 absolute = effectively untruncated (the official
#:          Cross-Modal Adapter code: trunc_normal_(std=0.01)); not identity.
INITS = ("zero_up", "lora", "normal")
POSITIONS = ("attn", "ffn")
FORMS = ("sequential", "parallel")
Site = Tuple[str, int, str]  # (modality, block index, position)


def check_choice(method: str, field: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise XModalError(f"{method}: field {field!r} must be one of {list(choices)}, got {value!r}")


def check_bottleneck_fields(method: str, config) -> None:
    """Validate the fields every bottleneck config has (called from `__post_init__`)."""
    if not isinstance(config.r, int) or isinstance(config.r, bool) or config.r < 1:
        raise XModalError(f"{method}: field 'r' must be a positive integer, got {config.r!r}")
    check_choice(method, "activation", config.activation, list(ACTIVATIONS))
    check_choice(method, "init", config.init, INITS)
    if not isinstance(config.dropout, (int, float)) or not 0.0 <= float(config.dropout) < 1.0:
        raise XModalError(f"{method}: field 'dropout' must be in [0, 1), got {config.dropout!r}")
    if not isinstance(config.init_std, (int, float)) or float(config.init_std) <= 0:
        raise XModalError(f"{method}: field 'init_std' must be > 0, got {config.init_std!r}")
    modalities_of(config.modalities)


def positions_of(method: str, spec) -> List[str]:
    """"attn" | "ffn" | "both" | list -> positions in block order."""
    if not isinstance(spec, (str, list, tuple)):
        raise XModalError(f"{method}: field 'positions' must be 'attn', 'ffn', 'both' or a list, got {spec!r}")
    items = list(POSITIONS) if spec == "both" else [spec] if isinstance(spec, str) else list(spec)
    for p in items:
        check_choice(method, "positions", p, (*POSITIONS, "both"))
    return [p for p in POSITIONS if p in items]


def layers_for(spec, modality: str, num_layers: int, field: str = "layers") -> List[int]:
    """A layer spec for one tower; a dict {"vision": spec, "text": spec} gives one per tower
    (missing towers get "all"), which towers of different depth (ViT-L/14) need for first:N/last:N."""
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"vision", "text"})
        if unknown:
            raise XModalError(f"{field}: unknown tower(s) {unknown}; expected keys 'vision' and/or 'text'")
        spec = spec.get(modality, "all")
    return select_layers(spec, num_layers, f"{field}[{modality}]")


# ------------------------------------------------------------------------ tensors
class Projection(nn.Module):
    """weight (out, in) and optional bias (out) like nn.Linear, but zero-width is allowed
    (a Cross-Modal Adapter whose shared slice covers a whole tower keeps no unique part)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def init_projection_(
    proj: Optional[Projection], role: str, init: str, std: float, fan_in: Optional[int] = None
) -> None:
    """Initialise a down ("down") or up ("up") projection; biases always start at zero.

    `fan_in` is the full input width when `proj` holds only part of a split down projection.
    """
    if proj is None:
        return
    with torch.no_grad():
        if proj.bias is not None:
            proj.bias.zero_()
        w = proj.weight
        if w.numel() == 0:
            return
        if role == "up" and init in ("zero_up", "lora"):
            w.zero_()
        elif init == "lora":
            # kaiming_uniform_(a=sqrt(5)) as nn.Linear: bound = 1 / sqrt(fan_in)
            bound = 1.0 / math.sqrt(fan_in or w.shape[1])
            w.uniform_(-bound, bound)
        elif init == "normal":
            # the official Cross-Modal Adapter code: trunc_normal_(std=0.01) with torch's default
            # bounds of +-2 ABSOLUTE, i.e. +-200 std: effectively an untruncated normal
            nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2.0, b=2.0)
        else:
            nn.init.trunc_normal_(w, mean=0.0, std=std, a=-2 * std, b=2 * std)


class SharedSlice(nn.Module):
    """The part of one site's bottleneck used by both towers.

    `up`: (d_s, r) weight + (d_s) bias producing the LAST d_s channels of the delta;
    `down`: (r, d_s) weight (no bias) reading the LAST d_s input channels.
    """

    def __init__(self, r: int, d_s: int, share_up: bool, share_down: bool, bias: bool = True):
        super().__init__()
        self.r, self.d_s = r, d_s
        self.up = Projection(r, d_s, bias=bias) if share_up else None
        self.down = Projection(d_s, r, bias=False) if share_down else None

    def reset_parameters(self, init: str, std: float) -> None:
        init_projection_(self.down, "down", init, std)
        init_projection_(self.up, "up", init, std)


class Bottleneck(nn.Module):
    """x (..., width) -> delta (..., width) through an r-dimensional bottleneck.

    `shared_in`/`shared_out` channels (the last ones) of the down/up projections are not
    owned here; forward takes them from the `SharedSlice` argument. Computation runs in the
    adapter's dtype (fp32) and the delta is cast back to the input's dtype (fp16 backbones).
    """

    def __init__(
        self,
        width: int,
        r: int,
        *,
        shared_in: int = 0,
        shared_out: int = 0,
        activation: str = "gelu_tanh",
        dropout: float = 0.0,
        scale: float = 1.0,
        bias: bool = True,
        layer_norm: bool = False,
        init: str = "zero_up",
        init_std: float = 0.01,
    ):
        super().__init__()
        if not 0 <= shared_in <= width or not 0 <= shared_out <= width:
            raise XModalError(f"shared width must be in [0, {width}], got in={shared_in}, out={shared_out}")
        self.width, self.r = width, r
        self.shared_in, self.shared_out = shared_in, shared_out
        self.activation = activation
        self.act = ACTIVATIONS[activation]
        self.scale = float(scale)
        self.norm = nn.LayerNorm(width) if layer_norm else None
        self.down = Projection(width - shared_in, r, bias=bias)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.up = Projection(r, width - shared_out, bias=bias)
        self.init, self.init_std = init, init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.norm is not None:
            self.norm.reset_parameters()
        init_projection_(self.down, "down", self.init, self.init_std, fan_in=self.width)
        init_projection_(self.up, "up", self.init, self.init_std)

    def forward(self, x: torch.Tensor, shared: Optional[SharedSlice] = None) -> torch.Tensor:
        if fused.is_enabled() and fused.supports(self):  # one autograd node per site (methods/fused.py)
            return fused.bottleneck_forward(self, x, shared)
        dtype = self.down.weight.dtype
        h = x.to(dtype)
        if self.norm is not None:
            h = self.norm(h)
        w_down = self.down.weight
        if self.shared_in:
            w_down = torch.cat([w_down, _need(shared, "down").weight], dim=1)
        z = self.act(F.linear(h, w_down, self.down.bias))
        if self.dropout is not None:
            z = self.dropout(z)
        w_up, b_up = self.up.weight, self.up.bias
        if self.shared_out:
            up = _need(shared, "up")
            w_up = torch.cat([w_up, up.weight], dim=0)
            b_up = torch.cat([b_up, up.bias]) if b_up is not None else None
        out = F.linear(z, w_up, b_up)
        if self.scale != 1.0:
            out = out * self.scale
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"width={self.width}, r={self.r}, shared_in={self.shared_in}, shared_out={self.shared_out}, "
            f"activation={self.activation}, scale={self.scale}"
        )


def _need(shared: Optional[SharedSlice], part: str) -> Projection:
    proj = getattr(shared, part, None) if shared is not None else None
    if proj is None:
        raise RuntimeError(f"this bottleneck shares its {part} projection but no shared slice was given")
    return proj


# ------------------------------------------------------------------------ methods
class BottleneckAdapterMethod(Method):
    """Base of bottleneck adapter methods: one `Bottleneck` per site, hooked into the blocks.

    Subclasses give the sites (`plan_sites`), the form, and how each site's bottleneck is
    built (`make_bottleneck`); `site_shared` returns the shared slice a site uses (if any).
    Parameters live in ModuleDicts `vision`/`text` keyed by block index then position.
    """

    def __init__(self, config, backbone: DualEncoder):
        super().__init__(config, backbone)
        self.identity_at_init = getattr(config, "init", "zero_up") != "normal"
        self.sites: List[Site] = self.plan_sites(backbone)
        towers: Dict[str, nn.ModuleDict] = {}
        for modality, index, position in self.sites:
            tower = towers.setdefault(modality, nn.ModuleDict())
            if str(index) not in tower:
                tower[str(index)] = nn.ModuleDict()
            tower[str(index)][position] = self.make_bottleneck(modality, index, position, backbone.width(modality))
        for modality, tower in towers.items():
            self.add_module(modality, tower)

    # -- what subclasses define
    def plan_sites(self, backbone: DualEncoder) -> List[Site]:
        cfg = self.config
        positions = positions_of(self.name, getattr(cfg, "positions", self.default_positions))
        return [
            (m, i, p)
            for m in modalities_of(cfg.modalities)
            for i in layers_for(cfg.layers, m, backbone.num_layers(m))
            for p in positions
        ]

    default_positions: Sequence[str] = POSITIONS

    def make_bottleneck(self, modality: str, index: int, position: str, width: int) -> Bottleneck:
        cfg = self.config
        return Bottleneck(
            width, cfg.r, activation=cfg.activation, dropout=cfg.dropout, scale=cfg.scale,
            layer_norm=getattr(cfg, "layer_norm", False), init=cfg.init, init_std=cfg.init_std,
        )

    def form(self) -> str:
        return getattr(self.config, "form", "sequential")

    def site_shared(self, modality: str, index: int, position: str) -> Optional[SharedSlice]:
        return None

    # -- lifecycle
    def bottleneck(self, modality: str, index: int, position: str) -> Bottleneck:
        return getattr(self, modality)[str(index)][position]

    def attach(self, backbone: DualEncoder) -> None:
        form = self.form()
        for modality, index, position in self.sites:
            fn = functools.partial(
                self.bottleneck(modality, index, position), shared=self.site_shared(modality, index, position)
            )
            self.add_handles(hook_block(backbone.blocks(modality)[index], position, fn, form))


__all__ = [
    "ACTIVATIONS", "INITS", "POSITIONS", "FORMS", "Projection", "SharedSlice", "Bottleneck",
    "BottleneckAdapterMethod", "init_projection_", "positions_of", "layers_for", "check_choice",
    "check_bottleneck_fields", "LayerSpec",
]
