"""Hugging Face peft interop for LoRA: export to, and import from, a peft LoRA folder.

A peft LoRA folder (`adapter_config.json` with `"peft_type": "LORA"` + `adapter_model.safetensors`)
adapts a transformers `CLIPModel`, whose attention has separate q/k/v projections, while
xmodal's LoRA adapts open_clip's fused `in_proj_weight` with one (A, B) pair per q/k/v row
block. The pairs map one to one, so conversion is a renaming:

    xmodal  vision.<i>.attn.in_proj.<q|k|v>.lora_A   <->  base_model.model.vision_model.encoder.layers.<i>.self_attn.<q|k|v>_proj.lora_A.weight
            vision.<i>.attn.out_proj.lora_B          <->  ...self_attn.out_proj.lora_B.weight
            vision.<i>.mlp.c_fc / mlp.c_proj         <->  ...mlp.fc1 / mlp.fc2
    (text.<i>... <-> text_model.encoder.layers.<i>...)

and the scale is the same (lora_alpha / r; `use_rslora` lora_alpha / sqrt(r) is folded into alpha).
`export_peft(model, dir)` writes a folder that `PeftModel.from_pretrained(CLIPModel, dir)` loads
and that gives the same embeddings; `load_adapter` recognises a peft folder and imports it with
`load_peft_adapter`. Not convertible (refused, naming the field): DoRA, trained biases,
modules_to_save, per-module rank/alpha patterns, LoRA on embeddings or projections.
Dropout: peft drops the LoRA input, xmodal drops rank components; both are off at inference,
so embeddings agree; an imported adapter keeps xmodal's dropout 0.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors.torch import load_file

from xmodal.atomic import atomic_directory
from xmodal.errors import CheckpointMismatchError, XModalError
from xmodal.safetensors_file import save_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_TOWER_TO_HF = {"vision": "vision_model", "text": "text_model"}
_LOCAL_TO_HF = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_HF_KEY = re.compile(
    r"^(?:base_model\.model\.)?(vision|text)_model\.encoder\.layers\.(\d+)\."
    r"(self_attn\.(?:q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)\.lora_(A|B)(?:\.[A-Za-z0-9_]+)?\.weight$"
)


def is_peft_adapter(directory) -> bool:
    """A folder whose adapter_config.json says `"peft_type": "LORA"` (or any peft type)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return False
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and "peft_type" in meta and "method" not in meta


def hf_module_name(modality: str, index: int, local: str, letter: Optional[str] = None) -> str:
    """open_clip LoRA target -> the transformers CLIPModel module it corresponds to."""
    part = f"self_attn.{letter}_proj" if local == "attn.in_proj" else _LOCAL_TO_HF[local]
    return f"{_TOWER_TO_HF[modality]}.encoder.layers.{index}.{part}"


def _lora_of(model):
    from xmodal.methods.lora import LoRA

    method = getattr(model, "method", model)
    if not isinstance(method, LoRA):
        raise XModalError(f"export_peft: the active method is {getattr(method, 'name', None)!r}; only 'lora' has a "
                          f"peft equivalent")
    return method


def peft_state(method) -> Tuple[Dict[str, torch.Tensor], list]:
    """(peft tensor dict, target module names) of an xmodal LoRA."""
    tensors, targets = {}, []
    for t in method.targets:
        modality, index, local = t.path.split(".", 2)
        for j, pair in t.pairs:
            letter = "qkv"[j] if local == "attn.in_proj" else None
            name = hf_module_name(modality, int(index), local, letter)
            targets.append(name)
            tensors[f"base_model.model.{name}.lora_A.weight"] = pair.lora_A.detach().float().cpu().contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = pair.lora_B.detach().float().cpu().contiguous()
    return tensors, targets


def export_peft(model, directory, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the active xmodal LoRA of `model` as a peft LoRA folder for a transformers CLIPModel."""
    method = _lora_of(model)
    cfg = method.config
    tensors, targets = peft_state(method)
    backbone = getattr(model, "backbone", None)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path or (backbone.pretrained if backbone is not None else None),
        "r": cfg.r,
        "lora_alpha": float(cfg.alpha),
        "lora_dropout": float(cfg.dropout),
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    with atomic_directory(directory) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_safetensors(tensors, tmp / WEIGHTS_NAME,
                         {"format": "pt", "exported_from": "xmodal lora", "xmodal_backbone": str(getattr(backbone, "name", ""))})
    return Path(directory)


def _refuse(meta: Dict[str, Any], where: str) -> None:
    checks = [
        (meta.get("peft_type") == "LORA", f"peft_type={meta.get('peft_type')!r}: only LORA converts to xmodal"),
        (not meta.get("use_dora"), "use_dora=true: DoRA has no xmodal equivalent"),
        (meta.get("bias", "none") == "none", f"bias={meta.get('bias')!r}: trained biases are not converted"),
        (not meta.get("modules_to_save"), f"modules_to_save={meta.get('modules_to_save')!r} is not converted"),
        (not meta.get("rank_pattern") and not meta.get("alpha_pattern"),
         "rank_pattern/alpha_pattern: per-module ranks are not converted"),
        (not meta.get("fan_in_fan_out"), "fan_in_fan_out=true is not a CLIPModel layout"),
    ]
    for ok, msg in checks:
        if not ok:
            raise XModalError(f"{where}: {msg}")


def peft_to_xmodal(meta: Dict[str, Any], tensors: Dict[str, torch.Tensor], where: str = "peft adapter"):
    """(LoRAConfig, xmodal state dict) from a peft LoRA config and its tensors."""
    from xmodal.methods.lora import LoRAConfig

    _refuse(meta, where)
    r = int(meta.get("r", 8))
    alpha = float(meta.get("lora_alpha", 8))
    if meta.get("use_rslora"):
        alpha = alpha * math.sqrt(r)  # peft scales by alpha / sqrt(r); xmodal by alpha / r
    found: Dict[Tuple[str, int, str], Dict[str, Dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        m = _HF_KEY.match(key)
        if not m:
            raise XModalError(f"{where}: tensor {key!r} is not a LoRA A/B of a CLIPModel attention or MLP "
                              f"linear; only those convert to xmodal")
        tower, index, part, ab = m.groups()
        letter = part[len("self_attn.")] if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") else None
        local = "attn.in_proj" if letter else {v: k for k, v in _LOCAL_TO_HF.items()}[part]
        slot = found.setdefault(("vision" if tower == "vision" else "text", int(index), local), {})
        slot.setdefault(letter or "", {})[ab] = value
    if not found:
        raise XModalError(f"{where}: no LoRA tensors in the adapter")
    letters = sorted({l for (_, _, local), pairs in found.items() if local == "attn.in_proj" for l in pairs},
                     key="qkv".index)
    modalities = sorted({m for m, _, _ in found})
    pattern = "|".join(re.escape(f"{m}.{i}.{local}") for m, i, local in sorted(found))
    config = LoRAConfig(r=r, alpha=alpha, dropout=0.0, target_modules=pattern, qkv=",".join(letters or "qkv"),
                        modalities=modalities[0] if len(modalities) == 1 else "both", layers="all")
    state: Dict[str, torch.Tensor] = {}
    for (m, i, local), pairs in found.items():
        for letter, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise XModalError(f"{where}: {hf_module_name(m, i, local, letter or None)} has lora_{''.join(ab)} "
                                  f"but not both A and B")
            prefix = f"{m}.{i}.{local}" + (f".{letter}" if letter else "")
            state[f"{prefix}.lora_A"] = ab["A"].float()
            state[f"{prefix}.lora_B"] = ab["B"].float()
        if local == "attn.in_proj":  # a q/k/v the adapter leaves alone: a zero pair (no update)
            ref = next(iter(pairs.values()))
            for letter in letters:
                if letter not in pairs:
                    prefix = f"{m}.{i}.{local}.{letter}"
                    state[f"{prefix}.lora_A"] = torch.zeros_like(ref["A"], dtype=torch.float32)
                    state[f"{prefix}.lora_B"] = torch.zeros_like(ref["B"], dtype=torch.float32)
    return config, state


def load_peft_adapter(model, directory, adapter_name: Optional[str] = None, activate: bool = True):
    """Import a peft LoRA trained on a transformers CLIPModel as an xmodal LoRA on `model`."""
    directory = Path(directory)
    cfg_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    try:
        meta = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise XModalError(f"{cfg_path}: not a readable peft config ({exc})") from None
    if not weights.is_file():
        hint = " (adapter_model.bin is pickle: convert it to safetensors with peft first)" \
            if (directory / "adapter_model.bin").is_file() else ""
        raise XModalError(f"{weights}: not found{hint}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        raise XModalError(f"{weights}: not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    config, state = peft_to_xmodal(meta, tensors, str(cfg_path))
    name = adapter_name or "default"
    try:
        method = model.add_method(config, name, activate=False)
    except XModalError as exc:
        raise CheckpointMismatchError(f"{cfg_path}: the peft adapter does not fit this backbone ({exc})") from None
    try:
        ref = next(iter(model.backbone.parameters()))
        method.load_trainable_state({k: v.to(ref.device) for k, v in state.items()}, model.backbone,
                                    source=f"{weights} (peft, base model {meta.get('base_model_name_or_path')!r})")
    except Exception:
        model.delete_method(name)
        raise
    method.imported_from = {"format": "peft", "base_model_name_or_path": meta.get("base_model_name_or_path")}
    method.weights_warning = None
    if activate:
        model.set_active(name)
    return method


__all__ = ["export_peft", "is_peft_adapter", "load_peft_adapter", "peft_to_xmodal", "peft_state", "hf_module_name"]
