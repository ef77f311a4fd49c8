"""CoOp (Zhou et al., IJCV 2022): learned context vectors in front of every caption.

n_ctx vectors replace placeholder words after start-of-text in the text encoder's input
embeddings; both towers stay frozen. Not identity at init: the context starts random
(or, with `init_text`, from the embeddings of a phrase such as "a video of").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from xmodal.backbones.dual_encoder import TEXT
from xmodal.errors import XModalError
from xmodal.methods.base import Method, MethodConfig, register
from xmodal.methods.prompting import placeholder_prefix, text_prompt_hooks


@dataclass
class CoOpConfig(MethodConfig):
    method = "coop"
    n_ctx: int = 4
    #: initialise the context from this phrase's token embeddings (its word count sets n_ctx)
    init_text: Optional[str] = None


@register
class CoOp(Method):
    name = "coop"
    config_class = CoOpConfig
    identity_at_init = False

    def __init__(self, config: CoOpConfig, backbone):
        super().__init__(config, backbone)
        width = backbone.width(TEXT)
        if config.init_text:
            tokens = backbone.tokenize([config.init_text])[0]
            ids = tokens[1:int(tokens.argmax())]
            if len(ids) != config.n_ctx:
                raise XModalError(
                    f"coop.init_text={config.init_text!r} has {len(ids)} tokens but n_ctx={config.n_ctx}"
                )
            with torch.no_grad():
                init = backbone.text_tower.token_embedding(ids).clone().float()
        else:
            init = torch.randn(config.n_ctx, width) * 0.02
        self.ctx = nn.Parameter(init)

    def tokenize_prefix(self) -> str:
        return placeholder_prefix(self.config.n_ctx)

    def attach(self, backbone) -> None:
        self.add_handles(text_prompt_hooks(backbone, [lambda: self.ctx]))
