"""Adapter-only checkpoints: `adapter_config.json` + `adapter_model.safetensors`.

Only the method's trainable tensors are stored (a few hundred KB for the Cross-Modal
Adapter on ViT-B/32), never the backbone; loading needs no pickle. Writes go to a
temporary directory that is renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from safetensors.torch import load_file, save_file

from xmodal import __version__
from xmodal.backbones.dual_encoder import TEXT, VISION
from xmodal.errors import CheckpointMismatchError, XModalError
from xmodal.methods.base import config_from_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def backbone_signature(backbone) -> Dict[str, Any]:
    return {
        "name": backbone.name,
        "vision_width": backbone.width(VISION),
        "text_width": backbone.width(TEXT),
        "vision_layers": backbone.num_layers(VISION),
        "text_layers": backbone.num_layers(TEXT),
        "embed_dim": backbone.embed_dim,
    }


def save_adapter(model, directory, adapter_name: Optional[str] = None, extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write the (active or named) adapter of `model` to `directory`, atomically."""
    name = adapter_name or model.active
    if name is None or name not in model.methods:
        raise XModalError(f"no adapter {name!r} to save; loaded: {list(model.methods)}")
    method = model.methods[name]
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "xmodal_version": __version__,
        "adapter_name": name,
        "backbone": backbone_signature(model.backbone),
        "backbone_pretrained": model.backbone.pretrained,
        **method.config.to_dict(),
    }
    if extra:
        meta["extra"] = extra
    tensors = {k: v.detach().contiguous().cpu() for k, v in method.trainable_state(model.backbone).items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "method": method.name})
        if directory.exists():
            # a non-empty directory cannot be replaced in one rename: move the old one aside
            # and put it back if the new one cannot take its place
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_adapter_config(directory) -> Dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        hint = ""
        old = Path(directory).with_name(Path(directory).name + ".old")
        if (old / CONFIG_NAME).is_file():
            hint = f"; an interrupted save left the previous checkpoint at {old}"
        raise XModalError(f"{path}: not found; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise XModalError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise XModalError(f"{path}: expected a JSON object with 'method' and the method's fields")
    return meta


def load_adapter(model, directory, adapter_name: Optional[str] = None, activate: bool = True):
    """Build the saved method on `model`'s backbone and load its tensors."""
    directory = Path(directory)
    meta = read_adapter_config(directory)
    cfg_path = directory / CONFIG_NAME
    saved = meta.get("backbone", {})
    here = backbone_signature(model.backbone)
    if saved.get("name") != here["name"]:
        raise CheckpointMismatchError(
            f"{cfg_path}: adapter was trained on backbone {saved.get('name')!r}, "
            f"but this model is {here['name']!r}"
        )
    diffs = [f"{k}: checkpoint {saved[k]} vs backbone {v}" for k, v in here.items() if k in saved and saved[k] != v]
    if diffs:
        raise CheckpointMismatchError(f"{cfg_path}: backbone shapes differ ({'; '.join(diffs)})")
    fields = {k: v for k, v in meta.items() if k not in ("xmodal_version", "adapter_name", "backbone", "backbone_pretrained", "extra")}
    config = config_from_dict(fields, source=str(cfg_path))
    name = adapter_name or meta.get("adapter_name") or "default"
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise XModalError(f"{weights}: not found")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        raise XModalError(
            f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
            f"the checkpoint is truncated or corrupt -- save the adapter again"
        ) from None
    method = model.add_method(config, name, activate=False)
    try:
        ref = next(iter(model.backbone.parameters()))
        state = {k: v.to(device=ref.device) for k, v in state.items()}
        method.load_trainable_state(state, model.backbone, source=str(weights))
    except Exception:
        model.delete_method(name)
        raise
    if activate:
        model.set_active(name)
    return method
