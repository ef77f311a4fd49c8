"""OpenAI's CLIP checkpoints: the released TorchScript `.pt` archives and OpenAI-layout state dicts.

Archives are read by `xmodal.safe_pickle.read_torchscript` (never `torch.jit.load`, which runs
the archive's code); their activation is read from the class of each `mlp.gelu` module.

A plain state dict from OpenAI's code (`clip.load(..., jit=False)` then `state_dict()`) has the
same key names as open_clip's, but every OpenAI CLIP was trained with QuickGELU, so it must be
recognised: by OpenAI's extra entries (`input_resolution`, `context_length`, `vocab_size`) when
present, else by the module order of OpenAI's `ResidualAttentionBlock` (attn, ln_1, mlp, ln_2;
open_clip registers ln_1 first), which an ordered pickle keeps. Safetensors sorts its keys, so
it carries no such evidence.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from xmodal.safe_pickle import ScriptArchive

# Entries of OpenAI's own checkpoints that are not parameters of the model.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")

# state-dict order of one block of OpenAI's model.py (attn, ln_1, mlp.c_fc, mlp.c_proj, ln_2)
OPENAI_BLOCK_ORDER = (
    "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias",
    "ln_1.weight", "ln_1.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
    "ln_2.weight", "ln_2.bias",
)
_FIRST_BLOCKS = ("visual.transformer.resblocks.0.", "transformer.resblocks.0.")

FORMAT_TORCHSCRIPT = "openai-torchscript"
FORMAT_STATE_DICT = "openai-state-dict"


def archive_state_dict(archive: ScriptArchive) -> Tuple[Dict[str, torch.Tensor], Union[None, bool, Dict[str, bool]]]:
    """(state dict, QuickGELU? -- one bool, per tower {'vision'|'text': bool} if they differ, None if unknown)."""
    acts: Dict[str, set] = {}
    for module, cls in archive.module_classes.items():
        if module.endswith("mlp.gelu"):
            tower = "vision" if module.startswith("visual.") else "text"
            acts.setdefault(tower, set()).add(cls)
    quick: Dict[str, bool] = {}
    for tower, classes in acts.items():
        if classes == {"QuickGELU"}:
            quick[tower] = True
        elif classes == {"GELU"}:
            quick[tower] = False
    if quick and len(set(quick.values())) == 1:
        return dict(archive.state_dict), next(iter(quick.values()))
    return dict(archive.state_dict), (quick or None)


def openai_evidence(keys: Sequence[str]) -> Optional[str]:
    """Why a plain state dict (keys in file order) comes from OpenAI's code, or None."""
    present = [k for k in OPENAI_META_KEYS if k in keys]
    if present:
        return f"it has OpenAI's {'/'.join(present)} entries"
    blocks = []
    for prefix in _FIRST_BLOCKS:
        order = [k[len(prefix):] for k in keys if k.startswith(prefix)]
        if order:
            blocks.append(tuple(order) == OPENAI_BLOCK_ORDER)
    if blocks and all(blocks) and "visual.class_embedding" in keys:
        return "its blocks are in the module order of OpenAI's CLIP code (attn before ln_1)"
    return None


def drop_meta(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k not in OPENAI_META_KEYS}


__all__: List[str] = [
    "OPENAI_META_KEYS",
    "OPENAI_BLOCK_ORDER",
    "FORMAT_TORCHSCRIPT",
    "FORMAT_STATE_DICT",
    "archive_state_dict",
    "openai_evidence",
    "drop_meta",
]
