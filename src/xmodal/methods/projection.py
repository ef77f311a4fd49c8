"""Projection-only baseline: train just the output projections of the towers.

`visual.proj` and `text_projection` map each tower's width to the shared embedding space;
re-learning only them is the cheapest linear-probe style transfer of a dual encoder.
`include_ln` adds the final LayerNorms (`ln_post` / `ln_final`) that sit right below them.
Tensors are trained in place; see `backbone_tuning` for how adapters switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Sequence, Union

from torch import nn

from xmodal.backbones.dual_encoder import DualEncoder
from xmodal.methods.backbone_tuning import BackboneTuning, head_parameters
from xmodal.methods.base import MethodConfig, modalities_of, register


@dataclass
class ProjectionConfig(MethodConfig):
    method: ClassVar[str] = "projection"
    #: "both", "vision" or "text"
    modalities: Union[str, Sequence[str]] = "both"
    #: also train the final LayerNorm of each selected tower
    include_ln: bool = False


@register
class Projection(BackboneTuning):
    name = "projection"
    config_class = ProjectionConfig
    identity_at_init = True

    def select(self, backbone: DualEncoder) -> List[nn.Parameter]:
        out: List[nn.Parameter] = []
        for modality in modalities_of(self.config.modalities):
            out.extend(head_parameters(backbone, modality, include_ln=self.config.include_ln))
        return out


__all__ = ["ProjectionConfig", "Projection"]
