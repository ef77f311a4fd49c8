"""Pretrained weights for OpenCLIP backbones: find them locally, read them safely, load them strictly.

Four sources are accepted for an architecture built by `factory.create_backbone`:

(a) an OpenCLIP pretrained tag (`openai`, `laion2b_s34b_b79k`, ...), resolved through open_clip's
    pretrained registry to a file that must already be in a local cache (the `cache_dir` given,
    the Hugging Face hub cache, or open_clip's URL cache `~/.cache/clip`). Nothing is downloaded
    unless `XMODAL_ALLOW_DOWNLOAD=1` is set and `HF_HUB_OFFLINE` is not;
(b) an OpenAI checkpoint file (`ViT-B-32.pt`): a TorchScript archive or a plain state dict;
(c) an OpenCLIP state dict `.safetensors` / `.bin` / `.pt` / `.pth`, possibly wrapped as
    `{"state_dict": ...}` with DDP `module.` prefixes, or a directory holding one;
(d) a Hugging Face `CLIPModel` directory (`config.json` + `model.safetensors` or
    `pytorch_model.bin`, sharded or not), whose keys are converted to open_clip's.

Security: files are read with safetensors or `torch.load(weights_only=True)`; a pickle that needs
code execution is refused. TorchScript archives (OpenAI's released `.pt` files) cannot go through
`weights_only` (torch refuses), so they are opened with `torch.jit.load`: that deserialises
TorchScript IR, not arbitrary pickled Python callables, and we only read its `state_dict()`.

Activation: OpenAI weights were trained with QuickGELU while open_clip's `ViT-B-32` config uses
nn.GELU. When the source says which activation its weights expect (a tag's `quick_gelu` flag, the
modules of a TorchScript archive, a HF config's `hidden_act`, OpenAI's own state-dict entries, or
our safetensors metadata), the MLP activation modules are swapped to match; parameters and the
module tree's state dict are unchanged. A plain state dict that says nothing keeps the
architecture's activation (use e.g. `ViT-B-32-quickgelu` for such OpenAI weights).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import open_clip
import torch
from open_clip.transformer import QuickGELU
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from xmodal.errors import WeightsNotFoundError, XModalError

OPENCLIP_SAFE_NAME = "open_clip_model.safetensors"
OPENCLIP_BIN_NAME = "open_clip_pytorch_model.bin"
HF_CONFIG_NAME = "config.json"
HF_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# Entries of OpenAI's own checkpoints that are not parameters of the model.
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")
# Wrappers whose prefix appears on every key: DDP, torch.compile, our DualEncoder.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "clip.")

ACTIVATION_META = "xmodal.activation"  # safetensors metadata written by save_openclip_checkpoint

KIND_FILE = "file"  # one checkpoint file: OpenCLIP/OpenAI state dict or TorchScript archive
KIND_HF = "hf_clip"  # a Hugging Face CLIPModel directory


@dataclass(frozen=True)
class WeightSource:
    """Where the weights for one backbone come from, found before the model is built."""

    kind: str  # KIND_FILE or KIND_HF
    path: Path  # the file, or the HF directory
    description: str  # short, user-facing: "openai (local cache: ...)" or the path
    quick_gelu: Optional[bool] = None  # activation the weights were trained with, when the source says


# --------------------------------------------------------------------------- errors
def weights_not_found(name: str, pretrained: str, reason: str) -> WeightsNotFoundError:
    """The single message for unavailable weights: the architecture and the four ways to supply them."""
    repo = _example_repo(name, pretrained)
    tag_hint = (
        f"e.g. run `huggingface-cli download {repo}` on a machine with network and copy its "
        f"~/.cache/huggingface/hub here"
        if repo
        else f"{name} has no OpenCLIP tags, so use (b)-(d)"
    )
    return WeightsNotFoundError(
        f"No weights for {name} with pretrained={pretrained!r}: {reason}. Supply them one of four ways: "
        f"(a) an OpenCLIP tag whose file is already in a local cache (--cache-dir DIR, the Hugging Face "
        f"cache ~/.cache/huggingface/hub or ~/.cache/clip; {tag_hint}), "
        f"(b) an OpenAI checkpoint file (--pretrained /path/{name}.pt, TorchScript archive or plain state dict), "
        f"(c) an OpenCLIP state dict (--pretrained /path/{OPENCLIP_SAFE_NAME}, or a .bin/.pt/.pth file), "
        f"(d) a Hugging Face CLIPModel directory with config.json and model.safetensors or pytorch_model.bin "
        f"(--pretrained /path/clip-vit-base-patch32/). "
        f"Weights are not downloaded unless XMODAL_ALLOW_DOWNLOAD=1 is set and HF_HUB_OFFLINE is not."
    )


def _example_repo(name: str, pretrained: str) -> Optional[str]:
    """The hub repo of the requested tag, else of `openai`, else of any tag of `name`."""
    tags = open_clip.list_pretrained_tags_by_model(name)
    first = [t for t in (pretrained.lower().replace("-", "_"), "openai") if t in tags]
    ordered = first + [t for t in tags if t not in first]
    for tag in ordered:
        hub = open_clip.get_pretrained_cfg(name, tag).get("hf_hub", "")
        if hub:
            return hub.split("/")[0] + "/" + hub.split("/")[1]
    return None


# ----------------------------------------------------------------------- resolution
def resolve_pretrained(
    name: str,
    pretrained: Union[str, os.PathLike, WeightSource],
    cache_dir: Optional[str] = None,
    download: Optional[bool] = None,
) -> WeightSource:
    """Find the weights for `pretrained` without reading them (fast: called before the model is built).

    Raises WeightsNotFoundError when nothing usable is found, XModalError for an unknown tag.
    `download=None` follows the environment (XMODAL_ALLOW_DOWNLOAD=1 and no HF_HUB_OFFLINE).
    """
    if isinstance(pretrained, WeightSource):
        return pretrained
    text = os.fspath(pretrained)
    if text == EMBEDDED_TAG:
        return _resolve_embedded(name)
    if not _looks_like_path(text) and open_clip.get_pretrained_cfg(name, text):
        return _resolve_tag(name, text, cache_dir, download)  # a tag, even if a same-named file is here
    path = Path(text).expanduser()
    if path.is_dir():
        return _resolve_directory(name, text, path)
    if path.is_file():
        return WeightSource(KIND_FILE, path.resolve(), str(path.resolve()))
    if _looks_like_path(text):
        raise weights_not_found(name, text, f"{path} does not exist")
    return _resolve_tag(name, text, cache_dir, download)


#: weights shipped inside the package (the project's own small CLIP, see its MODEL_CARD.md)
EMBEDDED_TAG = "xmodal"
EMBEDDED = {"xmodal-tiny": Path(__file__).resolve().parent.parent / "assets" / "xmodal-tiny" / "model.safetensors"}


def _resolve_embedded(name: str) -> WeightSource:
    path = EMBEDDED.get(name)
    if path is None:
        raise XModalError(
            f"pretrained={EMBEDDED_TAG!r} is the project's own embedded model and exists only for "
            f"{sorted(EMBEDDED)}; for {name} give an OpenCLIP tag or a checkpoint path"
        )
    if not path.is_file():
        raise weights_not_found(name, EMBEDDED_TAG, f"the packaged file {path} is missing (reinstall xmodal)")
    return WeightSource(KIND_FILE, path, f"{EMBEDDED_TAG} (embedded {name}, {path.name})")


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or os.sep in text
        or text.startswith(("~", "."))
        or text.lower().endswith(STATE_DICT_SUFFIXES)
    )


def _resolve_directory(name: str, text: str, path: Path) -> WeightSource:
    path = path.resolve()
    for fname in (OPENCLIP_SAFE_NAME, OPENCLIP_BIN_NAME):
        if (path / fname).is_file():
            return WeightSource(KIND_FILE, path / fname, str(path / fname))
    if (path / HF_CONFIG_NAME).is_file():
        if any((path / w).is_file() for w in HF_WEIGHT_NAMES):
            return WeightSource(KIND_HF, path, f"{path} (Hugging Face CLIPModel)")
        raise weights_not_found(
            name, text, f"{path} has {HF_CONFIG_NAME} but none of {', '.join(HF_WEIGHT_NAMES)}"
        )
    raise weights_not_found(
        name,
        text,
        f"directory {path} holds neither {OPENCLIP_SAFE_NAME}/{OPENCLIP_BIN_NAME} nor a Hugging Face "
        f"{HF_CONFIG_NAME} with model weights",
    )


def _resolve_tag(name: str, tag: str, cache_dir: Optional[str], download: Optional[bool]) -> WeightSource:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = ", ".join(tags) if tags else "none (it is not an OpenCLIP release)"
        raise XModalError(
            f"pretrained={tag!r} is neither an existing file/directory nor an OpenCLIP tag of {name}; "
            f"tags of {name}: {known}. Pass a tag, or a path to a checkpoint file or CLIPModel directory."
        )
    quick = bool(cfg.get("quick_gelu", False))
    candidates = tag_cache_candidates(cfg, cache_dir)
    for cand in candidates:
        if cand.is_file():
            return WeightSource(KIND_FILE, cand, f"{tag} (local cache: {cand})", quick_gelu=quick)
    if download is None:
        download = download_allowed()
    if download:
        try:
            target = open_clip.pretrained.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as exc:  # hub clients raise many types; the user sees one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise weights_not_found(name, tag, f"download failed ({type(exc).__name__}: {first[:200]})") from None
        if target and Path(target).is_file():
            return WeightSource(KIND_FILE, Path(target), f"{tag} (downloaded: {target})", quick_gelu=quick)
        raise weights_not_found(name, tag, "the download returned no file")
    wanted = []
    if cfg.get("hf_hub"):
        repo, fname = os.path.split(cfg["hf_hub"])
        wanted.append(f"{' or '.join(_hub_filenames(fname))} of hub repo {repo}")
    if cfg.get("url"):
        wanted.append(os.path.basename(cfg["url"]))
    looked = ", ".join(str(root) for root, _ in _cache_roots(cache_dir))
    raise weights_not_found(
        name, tag, f"its file ({'; or '.join(wanted) or 'none listed'}) is not in a local cache (looked in {looked})"
    )


def download_allowed() -> bool:
    """Downloads are opt-in (XMODAL_ALLOW_DOWNLOAD=1) and never happen in HF_HUB_OFFLINE mode."""
    on = os.environ.get("XMODAL_ALLOW_DOWNLOAD", "").strip().lower() in ("1", "true", "yes", "on")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return on and not offline


def hf_hub_cache_dirs() -> List[Path]:
    """The Hugging Face hub cache as huggingface_hub computes it, read from the environment now."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return [Path(os.environ[var]).expanduser()]
    if os.environ.get("HF_HOME"):
        return [Path(os.environ["HF_HOME"]).expanduser() / "hub"]
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path("~/.cache").expanduser()
    return [base / "huggingface" / "hub"]


def tag_cache_candidates(cfg: Mapping, cache_dir: Optional[str] = None) -> List[Path]:
    """Local files that would hold a tag's weights, in the order they are tried.

    For each root (`cache_dir` first, then the default caches): the hub layout
    `models--ORG--NAME/snapshots/*/FILE` (the ref `main` first), a `--local-dir` style copy
    `ROOT/ORG/NAME/FILE` or `ROOT/NAME/FILE`, and open_clip's URL cache `ROOT/<url basename>`.
    The safetensors variant of a file is preferred, as open_clip does.
    """
    hub = cfg.get("hf_hub", "")
    url = cfg.get("url", "")
    out: List[Path] = []
    if cfg.get("file"):
        out.append(Path(cfg["file"]).expanduser())
    repo, fname = os.path.split(hub) if hub else ("", "")
    filenames = _hub_filenames(fname) if hub else []
    for root, url_cache in _cache_roots(cache_dir):
        if repo:
            repo_dir = root / ("models--" + repo.replace("/", "--"))
            for snap in _snapshots(repo_dir):
                out += [snap / f for f in filenames]
            out += [root / repo / f for f in filenames]
            out += [root / repo.split("/")[-1] / f for f in filenames]
        if url and url_cache:
            out.append(root / os.path.basename(url))
    seen, unique = set(), []
    for p in out:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return unique


def _cache_roots(cache_dir: Optional[str]) -> List[Tuple[Path, bool]]:
    """(root, holds open_clip URL downloads) in search order: cache_dir, HF hub cache, ~/.cache/clip."""
    roots: List[Tuple[Path, bool]] = []
    if cache_dir:
        roots.append((Path(cache_dir).expanduser(), True))
    roots += [(r, False) for r in hf_hub_cache_dirs()]
    roots.append((Path("~/.cache/clip").expanduser(), True))
    return roots


def _hub_filenames(fname: str) -> List[str]:
    if not fname or fname == OPENCLIP_BIN_NAME:
        return [OPENCLIP_SAFE_NAME, OPENCLIP_BIN_NAME]
    if fname.endswith((".bin", ".pth")):
        return [fname[:-4] + ".safetensors", fname]
    return [fname]


def _snapshots(repo_dir: Path) -> List[Path]:
    snap_root = repo_dir / "snapshots"
    if not snap_root.is_dir():
        return []
    snaps = sorted((p for p in snap_root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        main = snap_root / ref.read_text().strip()
        snaps = [main] + [s for s in snaps if s != main]
    return snaps


# -------------------------------------------------------------------------- reading
@dataclass
class _Read:
    state_dict: Dict[str, torch.Tensor]
    fmt: str  # "safetensors" | "torchscript" | "pickle"
    quick_gelu: Optional[bool] = None
    openai: bool = False


def read_checkpoint(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """Read one checkpoint file safely into a flat state dict (wrappers and prefixes removed).

    Returns (state_dict, info) with info = {"format", "quick_gelu" (or None), "openai"}.
    """
    read = _read_file(Path(path))
    return read.state_dict, {"format": read.fmt, "quick_gelu": read.quick_gelu, "openai": read.openai}


def _read_file(path: Path) -> _Read:
    if not path.is_file():
        raise XModalError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if _is_torchscript(path):
        return _read_torchscript(path)
    return _read_pickle(path)


def _read_safetensors(path: Path) -> _Read:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        sd = load_file(str(path))
    except Exception as exc:  # safetensors has its own error types for bad headers / short files
        raise XModalError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); the file is truncated or corrupt"
        ) from None
    act = meta.get(ACTIVATION_META)
    quick = {"quick_gelu": True, "gelu": False}.get(act) if act else None
    sd, openai = _clean_state_dict(sd, path)
    return _Read(sd, "safetensors", quick if quick is not None else (True if openai else None), openai)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a `<archive>/constants.pkl` record (torch.save zips are not)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.split("/", 1)[-1] == "constants.pkl" for n in names)


def _read_torchscript(path: Path) -> _Read:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated upstream; loading still works
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise XModalError(f"{path}: not a readable TorchScript archive ({type(exc).__name__}: {exc})") from None
    sd = {k: v.detach() for k, v in module.state_dict().items()}
    acts = {
        sub.original_name
        for n, sub in module.named_modules()
        if n.endswith("mlp.gelu") and hasattr(sub, "original_name")
    }
    quick: Optional[bool] = None
    if acts == {"QuickGELU"}:
        quick = True
    elif acts == {"GELU"}:
        quick = False
    sd, openai = _clean_state_dict(sd, path)
    return _Read(sd, "torchscript", quick, openai)


def _read_pickle(path: Path) -> _Read:
    kwargs = {"mmap": True} if zipfile.is_zipfile(path) else {}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise XModalError(
            f"{path}: refusing to load: this pickle needs code execution to unpickle{what}. Only plain "
            f"tensors are read (torch.load weights_only=True); re-save the weights as a state dict or "
            f"as .safetensors from a trusted environment"
        ) from None
    except Exception as exc:
        raise XModalError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    sd = _unwrap(obj, path)
    sd, openai = _clean_state_dict(sd, path)
    return _Read(sd, "pickle", True if openai else None, openai)


def _unwrap(obj, path: Path) -> Dict[str, torch.Tensor]:
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


def _clean_state_dict(sd: Mapping, path: Path) -> Tuple[Dict[str, torch.Tensor], bool]:
    """Strip wrapper prefixes and OpenAI's non-parameter entries; True if those entries were there."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    openai = any(k in sd for k in OPENAI_META_KEYS)
    for k in OPENAI_META_KEYS:
        sd.pop(k, None)
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise XModalError(f"{path}: entries that are not tensors: {bad[:5]} (expected a state dict of tensors)")
    return sd, openai


# ------------------------------------------------------------- Hugging Face CLIPModel
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


def _tower_blocks(clip: nn.Module, tower: str):
    if tower == "vision":
        return getattr(getattr(clip.visual, "transformer", None), "resblocks", None)
    text = clip.text if hasattr(clip, "text") else clip
    return getattr(getattr(text, "transformer", None), "resblocks", None)


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
        blocks = _tower_blocks(clip, tower)
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


def _read_hf_directory(directory: Path) -> Dict[str, torch.Tensor]:
    """All tensors of a HF model directory (single file or sharded with an index)."""
    for fname in HF_WEIGHT_NAMES:
        path = directory / fname
        if not path.is_file():
            continue
        if fname.endswith(".index.json"):
            try:
                index = json.loads(path.read_text())
                shards = sorted(set(index["weight_map"].values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise XModalError(f"{path}: not a valid weight index (expected a 'weight_map' object): {exc}") from None
            sd: Dict[str, torch.Tensor] = {}
            for shard in shards:
                shard_path = directory / shard
                if not shard_path.is_file():
                    raise XModalError(f"{path}: lists shard {shard} which is not in {directory}")
                sd.update(_read_file(shard_path).state_dict)
            return sd
        return _read_file(path).state_dict
    raise XModalError(f"{directory}: none of {', '.join(HF_WEIGHT_NAMES)}")


# ---------------------------------------------------------------------- activation
def uses_quick_gelu(clip: nn.Module) -> Dict[str, bool]:
    """{'vision'|'text': whether that tower's MLPs use QuickGELU} for towers with open_clip blocks."""
    out = {}
    for tower in ("vision", "text"):
        blocks = _tower_blocks(clip, tower)
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
        for block in _tower_blocks(clip, tower):
            block.mlp.gelu = QuickGELU() if flag else nn.GELU()
        changed.append(tower)
    return changed


# -------------------------------------------------------------------------- loading
def load_pretrained(
    clip: nn.Module,
    name: str,
    pretrained: Union[str, os.PathLike, WeightSource],
    cache_dir: Optional[str] = None,
) -> str:
    """Load weights into an already-built open_clip CLIP; return a short description of the source.

    Strict: any missing or unexpected key or shape mismatch raises XModalError naming the file,
    the architecture and the first offending keys; the model is untouched in that case.
    """
    source = resolve_pretrained(name, pretrained, cache_dir=cache_dir)
    quick: Union[None, bool, Dict[str, bool]] = source.quick_gelu
    if source.kind == KIND_HF:
        cfg_path = source.path / HF_CONFIG_NAME
        try:
            config = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise XModalError(f"{cfg_path}: invalid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise XModalError(f"{cfg_path}: expected a JSON object (a HF CLIPConfig)")
        acts = check_hf_config(clip, config, str(cfg_path), name)
        state = hf_to_openclip(_read_hf_directory(source.path), str(source.path))
        quick = acts
        where = source.path
    else:
        read = _read_file(source.path)
        state = read.state_dict
        if quick is None:
            quick = read.quick_gelu
        where = source.path
    _load_strict(clip, state, where, name)
    description = source.description
    if source.kind == KIND_FILE and read.fmt == "torchscript":
        description += " (TorchScript archive)"
    if quick is not None:
        changed = set_quick_gelu(clip, quick)
        if changed:
            now = uses_quick_gelu(clip)
            acts_txt = ", ".join(f"{t}: {'QuickGELU' if now[t] else 'GELU'}" for t in changed)
            description += f"; activation set to match the weights ({acts_txt})"
    return description


def _load_strict(clip: nn.Module, state: Dict[str, torch.Tensor], where: Path, name: str) -> None:
    expected = clip.state_dict()
    # buffers the model does not persist (e.g. attn_mask) but TorchScript / old files carry
    transient = {n for n, _ in clip.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k not in transient}
    for key in ("logit_scale", "logit_bias"):
        if key in state and key in expected and state[key].shape != expected[key].shape:
            if state[key].numel() == expected[key].numel():
                state[key] = state[key].reshape(expected[key].shape)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (first: {'; '.join(shapes[:3])})")
        if missing:
            parts.append(f"{len(missing)} keys missing from the checkpoint (first: {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
        raise XModalError(
            f"{where}: weights do not fit architecture {name}: " + "; ".join(parts)
            + ". Is this a checkpoint of another architecture?"
        )
    for k, v in state.items():
        target = expected[k]
        if v.dtype != target.dtype and v.is_floating_point() and target.is_floating_point():
            state[k] = v.to(target.dtype)  # fp16/bf16 checkpoints into an fp32 model
    clip.load_state_dict(state, strict=True)


# -------------------------------------------------------------------------- writing
def _clip_of(model: nn.Module) -> nn.Module:
    return model.clip if hasattr(model, "clip") and isinstance(model.clip, nn.Module) else model


def _tensors(clip: nn.Module, fp16: bool) -> Dict[str, torch.Tensor]:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    acts = set(uses_quick_gelu(clip).values())
    if len(acts) == 1:
        meta[ACTIVATION_META] = "quick_gelu" if acts.pop() else "gelu"
    if getattr(model, "name", None):
        meta["xmodal.architecture"] = str(model.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(_tensors(clip, fp16), tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_hf_clip(model: nn.Module, directory: Union[str, os.PathLike], fp16: bool = False) -> Path:
    """Export as a HF `CLIPModel` directory (config.json + model.safetensors), atomically."""
    clip = _clip_of(model)
    directory = Path(directory)
    config = hf_config_for(clip)
    tensors = openclip_to_hf(_tensors(clip, fp16), source=str(getattr(model, "name", type(clip).__name__)))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (tmp / HF_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if directory.exists():
            old = directory.with_name(directory.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


__all__ = [
    "WeightSource",
    "resolve_pretrained",
    "load_pretrained",
    "read_checkpoint",
    "hf_to_openclip",
    "openclip_to_hf",
    "hf_config_for",
    "check_hf_config",
    "architecture_dims",
    "uses_quick_gelu",
    "set_quick_gelu",
    "save_openclip_checkpoint",
    "save_hf_clip",
    "tag_cache_candidates",
    "download_allowed",
    "weights_not_found",
]
