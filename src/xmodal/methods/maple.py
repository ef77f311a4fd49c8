"""MaPLe (Khattak et al., CVPR 2023): multi-modal prompts coupled text -> vision.

Deep text prompts P_j (n x d_text) occupy placeholder positions in the first `depth` text
blocks; the visual prompts of the same blocks are NOT free parameters but a linear coupling
function of them, V_j = P_j W_j + b_j (d_text -> d_vision), so vision prompts are conditioned
on language prompts. Defaults follow the paper (n=2 tokens, depth 9 for 12-block towers,
scaled proportionally for other depths).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from xmodal.backbones.dual_encoder import TEXT, VISION
from xmodal.errors import XModalError
from xmodal.methods.base import Method, MethodConfig, register
from xmodal.methods.prompting import init_prompts, placeholder_prefix, text_prompt_hooks, visual_prompt_hooks


@dataclass
class MaPLeConfig(MethodConfig):
    method = "maple"
    n_ctx: int = 2
    #: prompted blocks from the first; "auto" = 9/12 of the shallower tower (the paper's J=9)
    depth: object = "auto"


@register
class MaPLe(Method):
    name = "maple"
    config_class = MaPLeConfig
    identity_at_init = False

    def __init__(self, config: MaPLeConfig, backbone):
        super().__init__(config, backbone)
        limit = min(backbone.num_layers(TEXT), backbone.num_layers(VISION))
        depth = max(1, round(limit * 9 / 12)) if config.depth == "auto" else int(config.depth)
        if not 1 <= depth <= limit:
            raise XModalError(f"maple.depth={config.depth!r}: expected 'auto' or an integer in [1, {limit}]")
        self.depth = depth
        self.text = init_prompts(depth, config.n_ctx, backbone.width(TEXT))
        self.couple = nn.ModuleList(nn.Linear(backbone.width(TEXT), backbone.width(VISION)) for _ in range(depth))

    def tokenize_prefix(self) -> str:
        return placeholder_prefix(self.config.n_ctx)

    def attach(self, backbone) -> None:
        self.add_handles(text_prompt_hooks(backbone, [lambda p=p: p for p in self.text]))
        vision = [lambda j=j: self.couple[j](self.text[j]) for j in range(self.depth)]
        self.add_handles(visual_prompt_hooks(backbone.blocks(VISION), vision))
