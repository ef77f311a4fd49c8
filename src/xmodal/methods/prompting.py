"""Token-level prompt injection shared by CoOp, VPT, VL-Prompt and MaPLe.

Text prompts occupy placeholder tokens right after start-of-text: the method's
`tokenize_prefix()` puts n single-token placeholder words there ("X X X X", as CoOp does), so
CLIP's argmax end-of-text pooling and causal mask stay valid. The first text prompt replaces
the placeholders' token embeddings; deeper prompts replace the same positions at the input of
later blocks. Visual prompts are extra tokens inserted after CLS at the first prompted block
and replaced at deeper ones (VPT-deep); pooling reads CLS, so they never reach the output.
"""

from __future__ import annotations

from typing import Callable, List

import torch
from torch import nn

from xmodal.methods.base import rewrite_block_input

PLACEHOLDER = "X"


def placeholder_prefix(n: int) -> str:
    return " ".join([PLACEHOLDER] * n)


def splice(x: torch.Tensor, ctx: torch.Tensor, start: int, drop: int) -> torch.Tensor:
    """x[:, start:start+drop] replaced by the context tokens (n, D), shared across the batch."""
    ctx = ctx.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    return torch.cat([x[:, :start], ctx, x[:, start + drop:]], dim=1)


def replace_text_embeddings(token_embedding: nn.Module, get_ctx: Callable[[], torch.Tensor]):
    """Forward hook on the token embedding: positions 1..n become the learned context (n, D)."""

    def hook(module, args, out):
        ctx = get_ctx()
        return splice(out, ctx, 1, ctx.shape[0])

    return [token_embedding.register_forward_hook(hook)]


def replace_tokens_at_block(block: nn.Module, get_ctx: Callable[[], torch.Tensor], start: int = 1):
    """Pre-hook: tokens start..start+n of the block input become the context (n, D)."""

    def fn(x):
        ctx = get_ctx()
        return splice(x, ctx, start, ctx.shape[0])

    return rewrite_block_input(block, fn)


def insert_tokens_at_block(block: nn.Module, get_ctx: Callable[[], torch.Tensor]):
    """Pre-hook: insert n context tokens after CLS (the first prompted vision block)."""
    return rewrite_block_input(block, lambda x: splice(x, get_ctx(), 1, 0))


def visual_prompt_hooks(blocks: nn.ModuleList, contexts: List[Callable[[], torch.Tensor]]):
    """VPT-deep: insert at block 0, replace at blocks 1..len(contexts)-1."""
    handles = insert_tokens_at_block(blocks[0], contexts[0])
    for i, get_ctx in enumerate(contexts[1:], start=1):
        handles += replace_tokens_at_block(blocks[i], get_ctx)
    return handles


def text_prompt_hooks(backbone, contexts: List[Callable[[], torch.Tensor]]):
    """Deep text prompts: token embedding for the first, block inputs for the rest."""
    tower = backbone.text_tower
    handles = replace_text_embeddings(tower.token_embedding, contexts[0])
    blocks = backbone.blocks("text")
    for i, get_ctx in enumerate(contexts[1:], start=1):
        handles += replace_tokens_at_block(blocks[i], get_ctx)
    return handles


def init_prompts(depth: int, n: int, width: int, std: float = 0.02) -> nn.ParameterList:
    return nn.ParameterList([nn.Parameter(torch.randn(n, width) * std) for _ in range(depth)])
