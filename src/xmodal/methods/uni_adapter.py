"""Uni-modal adapters (Houlsby et al., 2019): sequential bottleneck adapters, nothing shared.

The baseline the Cross-Modal Adapter is measured against: every tower gets its own
down/up projections after attention and after the MLP of each block, delta =
scale * W_up GELU_tanh(W_down x + b). Structurally this is the Cross-Modal Adapter with
d_s = 0 (same defaults, same tensor names `<modality>.<block>.<attn|ffn>.{down,up}.*`), kept
under its own name so runs and checkpoints say which method was trained. The adapters
start at zero output (`init="zero_up"`), so training starts from the frozen model.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.methods.base import LayerSpec, MethodConfig, register
from xmodal.methods.bottleneck import FORMS, BottleneckAdapterMethod, check_bottleneck_fields, check_choice, positions_of


@dataclass
class UniAdapterConfig(MethodConfig):
    method = "uni_adapter"

    r: int = 8
    positions: str = "both"
    form: str = "sequential"
    layers: LayerSpec = "all"
    modalities: str = "both"
    activation: str = "gelu_tanh"
    scale: float = 1.0
    dropout: float = 0.0
    init: str = "zero_up"
    init_std: float = 0.01

    def __post_init__(self):
        check_bottleneck_fields(self.method, self)
        check_choice(self.method, "form", self.form, FORMS)
        positions_of(self.method, self.positions)


@register
class UniAdapter(BottleneckAdapterMethod):
    name = "uni_adapter"
    config_class = UniAdapterConfig
