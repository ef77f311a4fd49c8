"""VPT-deep (Jia et al., ECCV 2022): learned visual tokens at the input of every vision block.

n tokens are inserted after CLS at the first block and replaced by fresh learned tokens at
each deeper block, so every layer attends to its own prompts. Video frames share the prompts.
The inserted tokens change attention, so VPT is not identity at init.
"""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.backbones.dual_encoder import VISION
from xmodal.errors import XModalError
from xmodal.methods.base import Method, MethodConfig, register
from xmodal.methods.prompting import init_prompts, visual_prompt_hooks


@dataclass
class VPTConfig(MethodConfig):
    method = "vpt"
    n_tokens: int = 8
    #: number of blocks (from the first) that get their own prompts; 1 = VPT-shallow
    depth: object = "all"


def resolve_depth(depth, num_layers: int, field: str) -> int:
    d = num_layers if depth == "all" else int(depth)
    if not 1 <= d <= num_layers:
        raise XModalError(f"{field}={depth!r}: expected 'all' or an integer in [1, {num_layers}]")
    return d


@register
class VPT(Method):
    name = "vpt"
    config_class = VPTConfig
    identity_at_init = False

    def __init__(self, config: VPTConfig, backbone):
        super().__init__(config, backbone)
        depth = resolve_depth(config.depth, backbone.num_layers(VISION), "vpt.depth")
        self.vision = init_prompts(depth, config.n_tokens, backbone.width(VISION))

    def attach(self, backbone) -> None:
        getters = [lambda p=p: p for p in self.vision]
        self.add_handles(visual_prompt_hooks(backbone.blocks(VISION), getters))
