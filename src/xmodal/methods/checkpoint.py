"""Adapter-only checkpoints: `adapter_config.json` + `adapter_model.safetensors`.

Only the method's trainable tensors are stored (a few hundred KB for the Cross-Modal
Adapter on ViT-B/32), never the backbone; loading needs no pickle. Writes go to a
temporary directory that is swapped into place, so a crash never leaves half a checkpoint.

An adapter is only meaningful on the weights it was trained on, with the head, frames and
words it was trained with: `adapter_config.json` keeps that under "training" (see
`xmodal.provenance.training_record`), and loading refuses a backbone whose weights hash
differs (or, with `force=True`, loads it with a loud warning recorded on the method).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from safetensors.torch import load_file

from xmodal import __version__
from xmodal.atomic import atomic_directory
from xmodal.backbones.dual_encoder import TEXT, VISION
from xmodal.errors import CheckpointMismatchError, XModalError
from xmodal.methods.registry import config_from_dict
from xmodal.safetensors_file import save_safetensors

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


def save_adapter(model, directory, adapter_name: Optional[str] = None, extra: Optional[Dict[str, Any]] = None,
                 training: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the (active or named) adapter of `model` to `directory`, atomically.

    `training` (default: `model.training_record` when the training loop set it) records the
    backbone weights' hash, head, frames, words and dataset the adapter was trained with.
    """
    name = adapter_name or model.active
    if name is None or name not in model.methods:
        raise XModalError(f"no adapter {name!r} to save; loaded: {list(model.methods)}")
    method = model.methods[name]
    directory = Path(directory)
    meta = {
        "xmodal_version": __version__,
        "adapter_name": name,
        "backbone": backbone_signature(model.backbone),
        "backbone_pretrained": model.backbone.pretrained,
        **method.config.to_dict(),
    }
    training = training if training is not None else getattr(model, "training_record", None)
    if training:
        meta["training"] = dict(training)
    if extra:
        meta["extra"] = extra
    tensors = {k: v.detach().contiguous().cpu() for k, v in method.trainable_state(model.backbone).items()}
    head_module = getattr(model, "head_module", None)
    if head_module is not None:  # a trained similarity head travels with the adapter
        meta["similarity_head"] = dict(model.head_settings or {})
        tensors.update({HEAD_PREFIX + k: v.detach().contiguous().cpu() for k, v in head_module.state_dict().items()})
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        save_safetensors(tensors, tmp / WEIGHTS_NAME, {"format": "pt", "method": method.name})
    return directory


def read_adapter_config(directory) -> Dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        hint = ""
        here = Path(directory)
        olds = sorted(here.parent.glob(f".{here.name}.old-*")) if here.parent.is_dir() else []
        old = next((o for o in olds if (o / CONFIG_NAME).is_file()), None)
        if old is not None:
            hint = f"; an interrupted save left the previous checkpoint at {old}"
        raise XModalError(f"{path}: not found; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
    from xmodal.folder_files import file_inside, read_json_file

    meta = read_json_file(file_inside(directory, CONFIG_NAME), "an adapter config (adapter_config.json)")
    if not isinstance(meta, dict):
        raise XModalError(f"{path}: expected a JSON object with 'method' and the method's fields")
    return meta


#: adapter_config.json keys that describe the checkpoint, not the method's config
META_KEYS = ("xmodal_version", "adapter_name", "backbone", "backbone_pretrained", "extra", "training",
             "similarity_head")
#: safetensors prefix of a trained similarity head's tensors (seq_transformer), saved with the adapter
HEAD_PREFIX = "similarity_head."


def check_backbone_weights(meta: Mapping[str, Any], weights: Optional[Mapping[str, Any]], where: str,
                           force: bool = False) -> Optional[str]:
    """Refuse an adapter trained on other backbone weights than `weights` (a weights record).

    Returns None when they agree (or cannot be compared: an adapter without a training record,
    a backbone without a weights record); with `force` a mismatch returns the warning instead.
    """
    training = meta.get("training")
    if not isinstance(training, Mapping) or "weights_sha256" not in training or not weights:
        return None
    saved, here = training.get("weights_sha256"), weights.get("weights_sha256")
    if saved == here and (saved is not None or training.get("pretrained") == weights.get("pretrained")):
        return None

    def short(sha):
        return f"sha256 {sha[:12]}" if sha else "no weights hash"

    message = (f"{where}: adapter was trained on backbone weights {training.get('pretrained')!r} "
               f"({short(saved)}), but this backbone has {weights.get('pretrained')!r} ({short(here)})")
    if not force:
        raise CheckpointMismatchError(
            f"{message}; an adapter only means something on the weights it was trained on: give those weights "
            f"(--pretrained {training.get('pretrained')}), or pass --force to load it anyway")
    return message + "; loaded anyway (--force): these numbers are not the adapter's trained behaviour"


def load_adapter(model, directory, adapter_name: Optional[str] = None, activate: bool = True, *,
                 weights: Optional[Mapping[str, Any]] = None, force: bool = False):
    """Build the saved method on `model`'s backbone and load its tensors.

    `weights` is the backbone's weights record (default: `backbone.weights_info`); an adapter
    trained on weights with another hash is refused unless `force` (then the warning is
    printed to stderr and kept as `method.weights_warning`).
    """
    directory = Path(directory)
    from xmodal.methods.peft_interop import is_peft_adapter, load_peft_adapter

    if is_peft_adapter(directory):  # a Hugging Face peft LoRA folder: converted on the way in
        return load_peft_adapter(model, directory, adapter_name, activate=activate)
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
    if weights is None:
        weights = getattr(model.backbone, "weights_info", None)
    warning = check_backbone_weights(meta, weights, str(cfg_path), force=force)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    fields = {k: v for k, v in meta.items() if k not in META_KEYS}
    config = config_from_dict(fields, source=str(cfg_path))
    name = adapter_name or meta.get("adapter_name") or "default"
    from xmodal.folder_files import file_inside

    weights_file = file_inside(directory, WEIGHTS_NAME)
    if not weights_file.is_file():
        raise XModalError(f"{weights_file}: not found")
    try:
        state = load_file(str(weights_file))
    except Exception as exc:  # safetensors raises its own error types for bad headers / short files
        raise XModalError(
            f"{weights_file}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
            f"the checkpoint is truncated or corrupt -- save the adapter again"
        ) from None
    method = model.add_method(config, name, activate=False)
    try:
        ref = next(iter(model.backbone.parameters()))
        state = {k: v.to(device=ref.device) for k, v in state.items()}
        head_state = {k[len(HEAD_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(HEAD_PREFIX)]}
        method.load_trainable_state(state, model.backbone, source=str(weights_file))
        if head_state or "similarity_head" in meta:
            model.load_head_state(meta.get("similarity_head"), head_state, source=str(weights_file))
    except Exception:
        model.delete_method(name)
        raise
    method.weights_warning = warning
    if activate:
        model.set_active(name)
    return method
