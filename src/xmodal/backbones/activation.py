"""The MLP activation of each tower (QuickGELU or GELU), read and swapped without touching parameters.

OpenAI's CLIPs were trained with QuickGELU while open_clip's plain configs (e.g. `ViT-B-32`) build
nn.GELU; loading weights under the other activation shifts every embedding (~0.04 on ViT-B/32),
so the loaders set it to what the weights were trained with and say so.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Union

from open_clip.transformer import QuickGELU
from torch import nn

QUICK_GELU = "quick_gelu"
GELU = "gelu"
MIXED = "mixed"


def tower_blocks(clip: nn.Module, tower: str) -> Optional[nn.ModuleList]:
    """Residual blocks of the 'vision' or 'text' tower of an open_clip CLIP (None if it has none)."""
    if tower == "vision":
        return getattr(getattr(clip.visual, "transformer", None), "resblocks", None)
    text = clip.text if hasattr(clip, "text") else clip
    return getattr(getattr(text, "transformer", None), "resblocks", None)


def uses_quick_gelu(clip: nn.Module) -> Dict[str, bool]:
    """{'vision'|'text': whether that tower's MLPs use QuickGELU} for towers with open_clip blocks."""
    out = {}
    for tower in ("vision", "text"):
        blocks = tower_blocks(clip, tower)
        if blocks is not None and len(blocks) and hasattr(blocks[0], "mlp") and "gelu" in blocks[0].mlp._modules:
            out[tower] = isinstance(blocks[0].mlp.gelu, QuickGELU)
    return out


def set_quick_gelu(clip: nn.Module, quick: Union[bool, Mapping[str, bool]]) -> List[str]:
    """Swap the MLP activation modules of the towers to QuickGELU (True) or nn.GELU (False).

    Returns the towers that changed. No parameter or state-dict key is touched.
    """
    wanted = quick if isinstance(quick, Mapping) else {"vision": quick, "text": quick}
    changed = []
    current = uses_quick_gelu(clip)
    for tower, flag in wanted.items():
        if tower not in current or current[tower] == bool(flag):
            continue
        for block in tower_blocks(clip, tower):
            block.mlp.gelu = QuickGELU() if flag else nn.GELU()
        changed.append(tower)
    return changed


def activation_name(clip: nn.Module) -> str:
    """'quick_gelu' | 'gelu' for the whole model, 'mixed' when the towers differ."""
    acts = set(uses_quick_gelu(clip).values())
    if len(acts) == 1:
        return QUICK_GELU if acts.pop() else GELU
    return MIXED if acts else GELU


def describe(clip: nn.Module) -> str:
    """'QuickGELU' / 'GELU' / 'vision QuickGELU, text GELU' for messages."""
    acts = uses_quick_gelu(clip)
    if len(set(acts.values())) == 1:
        return "QuickGELU" if next(iter(acts.values())) else "GELU"
    return ", ".join(f"{t} {'QuickGELU' if q else 'GELU'}" for t, q in acts.items())
