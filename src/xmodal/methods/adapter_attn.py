"""Parallel adapter at the attention sub-layer (He et al., "Towards a Unified View of
Parameter-Efficient Transfer Learning", ICLR 2022).

    x_out = x + Attn(LN(x)) + s * W_up ReLU(W_down x + b)

The adapter runs parallel to the attention branch on the block input (the residual stream
before `ln_1`). Defaults follow the paper's choices: a bottleneck r = 30 (their small-budget
setting for modifying attention, where attention beats the FFN at ~0.1% parameters), the
scaled composition s = 4 of their scaled parallel adapter, ReLU, no dropout, and the "lora"
init of their code (down ~ kaiming-uniform, up = 0), so the model starts at the frozen one.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.methods.base import LayerSpec, MethodConfig, register
from xmodal.methods.bottleneck import BottleneckAdapterMethod, check_bottleneck_fields


@dataclass
class AdapterAttnConfig(MethodConfig):
    method = "adapter_attn"

    r: int = 30
    scale: float = 4.0
    dropout: float = 0.0
    layers: LayerSpec = "all"
    modalities: str = "both"
    activation: str = "relu"
    init: str = "lora"
    init_std: float = 0.01

    def __post_init__(self):
        check_bottleneck_fields(self.method, self)


@register
class AdapterAttn(BottleneckAdapterMethod):
    name = "adapter_attn"
    config_class = AdapterAttnConfig
    default_positions = ("attn",)

    def form(self) -> str:
        return "parallel"
