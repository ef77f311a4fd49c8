"""Full fine-tuning baseline: every backbone tensor of the selected towers is trained.

The reference point of the parameter-efficient papers (CLIP4Clip-style transfer). Its
"adapter" checkpoint is the whole trained state -- about 151M parameters, ~605 MB in fp32 for
ViT-B/32 -- which is exactly the per-task storage cost the adapters avoid. The CLIP
temperature `logit_scale` stays fixed unless `train_logit_scale` is set.
Tensors are trained in place; see `backbone_tuning` for how adapters switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Sequence, Union

from torch import nn

from xmodal.backbones.dual_encoder import DualEncoder
from xmodal.methods.backbone_tuning import BackboneTuning, tower_parameters
from xmodal.methods.base import MethodConfig, modalities_of, register


@dataclass
class FullFinetuneConfig(MethodConfig):
    method: ClassVar[str] = "full_finetune"
    #: "both", "vision" or "text"
    modalities: Union[str, Sequence[str]] = "both"
    #: also learn CLIP's temperature (and `logit_bias` on SigLIP-style models)
    train_logit_scale: bool = False


@register
class FullFinetune(BackboneTuning):
    name = "full_finetune"
    config_class = FullFinetuneConfig
    identity_at_init = True

    def select(self, backbone: DualEncoder) -> List[nn.Parameter]:
        out: List[nn.Parameter] = []
        for modality in modalities_of(self.config.modalities):
            out.extend(tower_parameters(backbone, modality))
        if self.config.train_logit_scale:
            for attr in ("logit_scale", "logit_bias"):
                p = getattr(backbone.clip, attr, None)
                if isinstance(p, nn.Parameter):
                    out.append(p)
        return out


__all__ = ["FullFinetuneConfig", "FullFinetune"]
