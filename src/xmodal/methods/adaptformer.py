"""AdaptFormer (Chen et al., NeurIPS 2022): a scaled parallel adapter beside each MLP.

    x_out = x + MLP(LN(x)) + s * W_up ReLU(W_down x + b)

The adapter reads the input of the MLP branch (the residual stream before `ln_2`) and its
output is added to the branch; placement ("ffn", parallel) is what defines the method and
is fixed. Defaults follow the paper's video setting: r = 64, s = 0.1, dropout 0.1 after the
ReLU, no LayerNorm inside the adapter (`layer_norm=True` adds one on its input), and
"lora" init (down ~ kaiming-uniform, up = 0, biases 0), so the model starts at the frozen one.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.methods.base import LayerSpec, MethodConfig, register
from xmodal.methods.bottleneck import BottleneckAdapterMethod, check_bottleneck_fields


@dataclass
class AdaptFormerConfig(MethodConfig):
    method = "adaptformer"

    r: int = 64
    scale: float = 0.1
    dropout: float = 0.1
    layers: LayerSpec = "all"
    modalities: str = "both"
    activation: str = "relu"
    layer_norm: bool = False
    init: str = "lora"
    init_std: float = 0.01

    def __post_init__(self):
        check_bottleneck_fields(self.method, self)


@register
class AdaptFormer(BottleneckAdapterMethod):
    name = "adaptformer"
    config_class = AdaptFormerConfig
    default_positions = ("ffn",)

    def form(self) -> str:
        return "parallel"
