"""Hugging Face `CLIPModel` directories: read (single file or sharded), convert keys both ways, export.

A HF directory holds `config.json` and `model.safetensors` / `pytorch_model.bin`, or shards with
an index. Its keys are converted to open_clip's (q/k/v concatenated into `in_proj`, projection
matrices transposed); the config is checked against the architecture (heads do not show in
parameter shapes) and its `hidden_act` gives each tower's activation. Files are only read inside
the directory: shard names with `..` or links that lead outside it are refused (inside a Hugging
Face hub snapshot, links into the repo's `blobs/` are how the cache works and are followed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, Mapping, Tuple, Union

import torch
from open_clip.transformer import QuickGELU
from torch import nn

from xmodal.atomic import atomic_directory
from xmodal.backbones.activation import tower_blocks
from xmodal.backbones.openclip_checkpoint import _clip_of, check_tensors, cpu_tensors, strip_prefixes, unwrap
from xmodal.backbones.weight_file import CONTAINER_SAFETENSORS, CONTAINER_TORCHSCRIPT, read_weight_file
from xmodal.errors import XModalError
from xmodal.safe_pickle import UnsafeFileError
from xmodal.safetensors_file import save_safetensors

HF_CONFIG_NAME = "config.json"
HF_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
FORMAT = "hf-directory"

_HF_DIRECT = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
# nn.Linear weights (out, in) in HF vs right-multiplied projection matrices (in, out) in open_clip
_HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
_HF_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_TOWER_PREFIX = {"text": "transformer.resblocks", "vision": "visual.transformer.resblocks"}
_HF_LAYER_RE = re.compile(r"^(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OC_LAYER_RE = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OC_INPROJ_RE = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def hf_to_openclip(hf_sd: Mapping[str, torch.Tensor], source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """Convert a HF `CLIPModel` state dict to open_clip `CLIP` keys.

    q/k/v projections are concatenated (in that order) into `in_proj_weight`/`in_proj_bias`,
    the projection Linear weights are transposed, `position_ids` buffers are dropped.
    """
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[Tuple[str, str, str], Dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in hf_sd.items():
        if key.endswith("position_ids"):
            continue
        if key in _HF_DIRECT:
            out[_HF_DIRECT[key]] = value
            continue
        if key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = _HF_LAYER_RE.match(key)
        if m:
            tower, idx, part, kind = m.groups()
            prefix = f"{_TOWER_PREFIX[tower]}.{idx}"
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, kind, key.rsplit(".", 3)[0]), {})[part[-6]] = value
                continue
            if part in _HF_LAYER_PARTS:
                out[f"{prefix}.{_HF_LAYER_PARTS[part]}.{kind}"] = value
                continue
        unknown.append(key)
    if unknown:
        raise XModalError(
            f"{source}: {len(unknown)} keys that a HF CLIPModel -> open_clip conversion does not know, "
            f"first: {unknown[:5]} (only the standard CLIP ViT layout is supported)"
        )
    for (prefix, kind, hf_prefix), parts in qkv.items():
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise XModalError(
                f"{source}: {hf_prefix}.self_attn is missing {', '.join(p + '_proj.' + kind for p in missing)}"
            )
        out[f"{prefix}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def openclip_to_hf(sd: Mapping[str, torch.Tensor], source: str = "model") -> Dict[str, torch.Tensor]:
    """Inverse of `hf_to_openclip`: open_clip `CLIP` keys -> HF `CLIPModel` keys (no position_ids)."""
    direct = {v: k for k, v in _HF_DIRECT.items()}
    transposed = {v: k for k, v in _HF_TRANSPOSED.items()}
    parts = {v: k for k, v in _HF_LAYER_PARTS.items()}
    towers = {"visual.transformer": "vision", "transformer": "text"}
    out: Dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in direct:
            out[direct[key]] = value
            continue
        if key in transposed:
            out[transposed[key]] = value.t().contiguous()
            continue
        m = _OC_INPROJ_RE.match(key)
        if m:
            tower, idx, kind = m.groups()
            prefix = f"{towers[tower]}_model.encoder.layers.{idx}.self_attn"
            for letter, t in zip("qkv", value.chunk(3, dim=0)):
                out[f"{prefix}.{letter}_proj.{kind}"] = t.contiguous()
            continue
        m = _OC_LAYER_RE.match(key)
        if m and m.group(3) in parts:
            tower, idx, part, kind = m.groups()
            out[f"{towers[tower]}_model.encoder.layers.{idx}.{parts[part]}.{kind}"] = value
            continue
        unknown.append(key)
    if unknown:
        raise XModalError(
            f"{source}: {len(unknown)} open_clip keys have no HF CLIPModel equivalent, first: {unknown[:5]} "
            f"(only the standard CLIP ViT layout can be exported)"
        )
    return out


# HF defaults used when a config omits a field (transformers' CLIPTextConfig / CLIPVisionConfig).
_HF_TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
)
_HF_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=32, hidden_act="quick_gelu",
)
_HF_ACTS = {"quick_gelu": True, "gelu": False}


def architecture_dims(clip: nn.Module) -> Dict[str, object]:
    """The numbers a HF CLIP config states, read from a built open_clip CLIP.

    {"text": {...}, "vision": {...}, "projection_dim": int}, field names as in HF configs.
    """
    if not hasattr(clip, "transformer") or not hasattr(clip.visual, "conv1"):
        raise XModalError(
            f"{type(clip).__name__}: only open_clip CLIP models with a ViT vision tower and the built-in "
            f"text transformer map to a HF CLIPModel"
        )
    dims: Dict[str, object] = {}
    for tower in ("text", "vision"):
        blocks = tower_blocks(clip, tower)
        first = blocks[0]
        dims[tower] = dict(
            hidden_size=first.ln_1.normalized_shape[0],
            intermediate_size=first.mlp.c_fc.out_features,
            num_hidden_layers=len(blocks),
            num_attention_heads=first.attn.num_heads,
            hidden_act="quick_gelu" if isinstance(first.mlp.gelu, QuickGELU) else "gelu",
        )
    dims["text"].update(vocab_size=clip.token_embedding.num_embeddings, max_position_embeddings=clip.context_length)
    size, patch = clip.visual.image_size, clip.visual.patch_size
    dims["vision"].update(
        image_size=size[0] if isinstance(size, (tuple, list)) else size,
        patch_size=patch[0] if isinstance(patch, (tuple, list)) else patch,
    )
    dims["projection_dim"] = int(clip.text_projection.shape[1])
    return dims


def hf_config_for(clip: nn.Module) -> Dict[str, object]:
    """A HF `CLIPModel` config.json describing `clip` (for export and for tests)."""
    dims = architecture_dims(clip)
    proj = dims["projection_dim"]
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": proj,
        "logit_scale_init_value": 2.6592,
        "text_config": {"model_type": "clip_text_model", "projection_dim": proj, "layer_norm_eps": 1e-5, **dims["text"]},
        "vision_config": {
            "model_type": "clip_vision_model", "projection_dim": proj, "layer_norm_eps": 1e-5,
            "num_channels": 3, **dims["vision"],
        },
    }


def check_hf_config(clip: nn.Module, config: Mapping, source: str, name: str) -> Dict[str, bool]:
    """Compare a HF config with the architecture; return {'text'|'vision': uses QuickGELU}.

    Heads are checked here because they do not show in parameter shapes.
    """
    model_type = config.get("model_type")
    if model_type not in (None, "clip"):
        raise XModalError(f"{source}: model_type {model_type!r} is not a HF CLIPModel (expected 'clip')")
    dims = architecture_dims(clip)
    diffs, acts = [], {}
    for tower, defaults in (("text", _HF_TEXT_DEFAULTS), ("vision", _HF_VISION_DEFAULTS)):
        cfg = config.get(f"{tower}_config") or config.get(f"{tower}_config_dict") or {}
        for field, default in defaults.items():
            value = cfg.get(field, default)
            if field == "hidden_act":
                if value not in _HF_ACTS:
                    raise XModalError(
                        f"{source}: {tower}_config.hidden_act={value!r} is not supported (expected one of {sorted(_HF_ACTS)})"
                    )
                acts[tower] = _HF_ACTS[value]
                continue
            if value != dims[tower][field]:
                diffs.append(f"{tower}_config.{field}={value} but {name} has {dims[tower][field]}")
    proj = config.get("projection_dim", 512)
    if proj != dims["projection_dim"]:
        diffs.append(f"projection_dim={proj} but {name} has {dims['projection_dim']}")
    if diffs:
        raise XModalError(f"{source}: this CLIPModel is not a {name}: " + "; ".join(diffs))
    return acts


def contained_file(directory: Path, name: str, source: Union[str, Path]) -> Path:
    """`directory/name`, refusing names that leave the directory and links that point outside it."""
    if (not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name
            or ".." in name.split("/") or "\x00" in name):
        raise UnsafeFileError(f"{source}: file name {str(name)[:80]!r} leaves the directory {directory}")
    path = directory / name
    real_dir = directory.resolve()
    allowed = real_dir
    if real_dir.parent.name == "snapshots" and real_dir.parent.parent.name.startswith("models--"):
        allowed = real_dir.parent.parent  # hub cache: snapshots/<rev>/file -> ../../blobs/<sha>
    real = path.resolve()
    if real != allowed and allowed not in real.parents:
        raise UnsafeFileError(
            f"{source}: {path} is a link to {real}, outside {directory}; copy the file into the directory"
        )
    return path


def read_hf_config(directory: Path) -> Dict[str, object]:
    """The directory's config.json as a dict (one-line error if it is not a JSON object)."""
    cfg_path = contained_file(directory, HF_CONFIG_NAME, directory)
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        raise XModalError(f"{cfg_path}: invalid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(config, dict):
        raise XModalError(f"{cfg_path}: expected a JSON object (a HF CLIPConfig)")
    return config


def read_hf_directory(directory: Path) -> Tuple[Dict[str, torch.Tensor], str, Path]:
    """(HF state dict, sha256, path hashed) of a HF model directory, single file or sharded.

    The hash is the weights file's; for shards, the sha256 of their bytes concatenated in index order.
    """
    for fname in HF_WEIGHT_NAMES:
        path = contained_file(directory, fname, directory)
        if not path.is_file():
            continue
        if fname.endswith(".index.json"):
            try:
                index = json.loads(path.read_text())
                shards = sorted(set(index["weight_map"].values()))
            except (ValueError, RecursionError, KeyError, TypeError, AttributeError) as exc:
                raise XModalError(f"{path}: not a valid weight index (expected a 'weight_map' object): {exc}") from None
            sd: Dict[str, torch.Tensor] = {}
            digest = hashlib.sha256()
            for shard in shards:
                shard_path = contained_file(directory, shard, path)
                if not shard_path.is_file():
                    raise XModalError(f"{path}: lists shard {shard} which is not in {directory}")
                part, raw_hash = _read_weights(shard_path)
                digest.update(raw_hash.encode())
                sd.update(part)
            return sd, digest.hexdigest(), path
        sd, sha = _read_weights(path)
        return sd, sha, path
    raise XModalError(f"{directory}: none of {', '.join(HF_WEIGHT_NAMES)}")


def _read_weights(path: Path) -> Tuple[Dict[str, torch.Tensor], str]:
    raw = read_weight_file(path)
    if raw.container == CONTAINER_TORCHSCRIPT:
        raise XModalError(f"{path}: a TorchScript archive inside a Hugging Face directory (expected a state dict)")
    sd = strip_prefixes(raw.contents if raw.container == CONTAINER_SAFETENSORS else unwrap(raw.contents, path))
    check_tensors(sd, path)
    return sd, raw.sha256


def save_hf_clip(model: nn.Module, directory: Union[str, os.PathLike], fp16: bool = False) -> Path:
    """Export as a HF `CLIPModel` directory (config.json + model.safetensors), atomically."""
    clip = _clip_of(model)
    directory = Path(directory)
    config = hf_config_for(clip)
    tensors = openclip_to_hf(cpu_tensors(clip, fp16), source=str(getattr(model, "name", type(clip).__name__)))
    with atomic_directory(directory) as tmp:
        (tmp / HF_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_safetensors(tensors, tmp / "model.safetensors", {"format": "pt"})
    return directory
