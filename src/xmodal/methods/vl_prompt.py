"""VL-Prompt: independent deep prompts in both towers (VPT-deep in vision, deep text prompts).

The uni-modal prompt baseline of the multi-modal prompt papers: text prompts occupy
placeholder positions after start-of-text at the first `text_depth` blocks, visual prompts are
VPT-deep tokens; nothing couples the two (contrast MaPLe).
"""

from __future__ import annotations

from dataclasses import dataclass

from xmodal.backbones.dual_encoder import TEXT, VISION
from xmodal.methods.base import Method, MethodConfig, register
from xmodal.methods.prompting import init_prompts, placeholder_prefix, text_prompt_hooks, visual_prompt_hooks
from xmodal.methods.vpt import resolve_depth


@dataclass
class VLPromptConfig(MethodConfig):
    method = "vl_prompt"
    n_text: int = 4
    n_vision: int = 8
    text_depth: object = "all"
    vision_depth: object = "all"


@register
class VLPrompt(Method):
    name = "vl_prompt"
    config_class = VLPromptConfig
    identity_at_init = False

    def __init__(self, config: VLPromptConfig, backbone):
        super().__init__(config, backbone)
        td = resolve_depth(config.text_depth, backbone.num_layers(TEXT), "vl_prompt.text_depth")
        vd = resolve_depth(config.vision_depth, backbone.num_layers(VISION), "vl_prompt.vision_depth")
        self.text = init_prompts(td, config.n_text, backbone.width(TEXT))
        self.vision = init_prompts(vd, config.n_vision, backbone.width(VISION))

    def tokenize_prefix(self) -> str:
        return placeholder_prefix(self.config.n_text)

    def attach(self, backbone) -> None:
        self.add_handles(text_prompt_hooks(backbone, [lambda p=p: p for p in self.text]))
        self.add_handles(visual_prompt_hooks(backbone.blocks(VISION), [lambda p=p: p for p in self.vision]))
