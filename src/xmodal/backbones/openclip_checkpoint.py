"""OpenCLIP state dicts: bare or wrapped training checkpoints, `.safetensors`/`.bin`/`.pt`; and writing them.

A training checkpoint is unwrapped (`{"state_dict": ...}`, `{"model": ...}`) and wrapper prefixes
are stripped (DDP `module.`, torch.compile `_orig_mod.`, our DualEncoder's `clip.`). Files written
by xmodal record the MLP activation in their safetensors metadata, so loading restores it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from xmodal.backbones.activation import uses_quick_gelu
from xmodal.errors import XModalError
from xmodal.safetensors_file import write_safetensors

OPENCLIP_SAFE_NAME = "open_clip_model.safetensors"
OPENCLIP_BIN_NAME = "open_clip_pytorch_model.bin"
ACTIVATION_META = "xmodal.activation"  # safetensors metadata written by save_openclip_checkpoint
# Wrappers whose prefix appears on every key: DDP, torch.compile, our DualEncoder.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "clip.")
FORMAT = "openclip-state-dict"

_HF_PREFIXES = ("text_model.", "vision_model.")


def unwrap(obj, path: Path) -> Dict[str, torch.Tensor]:
    """Find the state dict in a training checkpoint ({"state_dict": ...}, {"model": ...}) or a bare one."""
    if not isinstance(obj, Mapping):
        raise XModalError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in ("state_dict", "model", "module"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and any(torch.is_tensor(v) for v in inner.values()):
            return dict(inner)
    if any(torch.is_tensor(v) for v in obj.values()):
        return dict(obj)
    raise XModalError(
        f"{path}: no state dict found; top-level keys: {sorted(map(str, obj))[:8]} "
        f"(expected tensors, or a 'state_dict' entry holding them)"
    )


def strip_prefixes(sd: Mapping) -> Dict[str, torch.Tensor]:
    """Remove wrapper prefixes shared by every key (repeatedly: `module._orig_mod.`)."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def check_tensors(sd: Mapping, path: Path) -> None:
    bad = [str(k) for k, v in sd.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise XModalError(f"{path}: entries that are not tensors: {bad[:5]} (expected a state dict of tensors)")


def refuse_hf_weights(sd: Mapping, path: Path) -> None:
    """A lone HF `model.safetensors` has text_model./vision_model. keys and needs its config.json."""
    keys = [k for k in sd if isinstance(k, str)]
    if keys and sum(k.startswith(_HF_PREFIXES) for k in keys) > len(keys) // 2:
        raise XModalError(
            f"{path}: holds Hugging Face CLIPModel weights (text_model.*/vision_model.* keys), which need their "
            f"config.json; pass the directory that holds both (--pretrained {path.parent}/)"
        )


def activation_from_metadata(meta: Mapping[str, str]) -> Optional[bool]:
    return {"quick_gelu": True, "gelu": False}.get(meta.get(ACTIVATION_META, ""))


def _clip_of(model: nn.Module) -> nn.Module:
    return model.clip if hasattr(model, "clip") and isinstance(model.clip, nn.Module) else model


def cpu_tensors(clip: nn.Module, fp16: bool) -> Dict[str, torch.Tensor]:
    out = {}
    for k, v in clip.state_dict().items():
        v = v.detach().to("cpu")
        if fp16 and v.is_floating_point():
            v = v.to(torch.float16)
        out[k] = v.contiguous()
    return out


def save_openclip_checkpoint(model: nn.Module, path: Union[str, os.PathLike], fp16: bool = False) -> Path:
    """Write an OpenCLIP state dict as safetensors (atomically), loadable with `pretrained=path`.

    `model` is a DualEncoder or an open_clip CLIP. The MLP activation is recorded in the file's
    metadata so loading restores it. `fp16=True` halves the file; loading casts back.
    """
    clip = _clip_of(model)
    path = Path(path)
    if path.suffix != ".safetensors":
        raise XModalError(f"{path}: an OpenCLIP checkpoint written by xmodal must end in .safetensors")
    meta = {"format": "pt"}
    acts = set(uses_quick_gelu(clip).values())
    if len(acts) == 1:
        meta[ACTIVATION_META] = "quick_gelu" if acts.pop() else "gelu"
    if getattr(model, "name", None):
        meta["xmodal.architecture"] = str(model.name)
    tensors = cpu_tensors(clip, fp16)
    return write_safetensors(path, tensors, meta)

