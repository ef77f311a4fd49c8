"""Partial fine-tuning baseline: train the last k blocks of each tower (Partial-k).

"Partial-k" as in VPT (Jia et al., 2022) and the PEFT baselines of the text-video adapter
papers (Cross-Modal Adapter, MV-Adapter): everything below the last `k` residual blocks stays
frozen. With `include_head` (default) the tensors above the last block -- the final
LayerNorm (`ln_post` / `ln_final`) and the output projection (`proj` / `text_projection`) --
are trained too, since they are part of "the top of the network". Default k=1.
Tensors are trained in place; see `backbone_tuning` for how adapters switch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, List, Sequence, Union

from torch import nn

from xmodal.backbones.dual_encoder import DualEncoder
from xmodal.errors import XModalError
from xmodal.methods.backbone_tuning import BackboneTuning, head_parameters
from xmodal.methods.base import MethodConfig, modalities_of, register


@dataclass
class PartialConfig(MethodConfig):
    method: ClassVar[str] = "partial"
    #: number of last residual blocks trained in each selected tower (0: only the head)
    k: int = 1
    #: "both", "vision" or "text"
    modalities: Union[str, Sequence[str]] = "both"
    #: also train the final LayerNorm and the output projection of each selected tower
    include_head: bool = True


@register
class Partial(BackboneTuning):
    name = "partial"
    config_class = PartialConfig
    identity_at_init = True

    def select(self, backbone: DualEncoder) -> List[nn.Parameter]:
        cfg = self.config
        out: List[nn.Parameter] = []
        for modality in modalities_of(cfg.modalities):
            blocks = backbone.blocks(modality)
            if not isinstance(cfg.k, int) or not 0 <= cfg.k <= len(blocks):
                raise XModalError(
                    f"partial: k={cfg.k!r} must be an integer in [0, {len(blocks)}] "
                    f"(the {modality} tower has {len(blocks)} blocks)"
                )
            for block in list(blocks)[len(blocks) - cfg.k:]:
                out.extend(block.parameters())
            if cfg.include_head:
                out.extend(head_parameters(backbone, modality))
        return out


__all__ = ["PartialConfig", "Partial"]
