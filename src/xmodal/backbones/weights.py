"""Pretrained weights for OpenCLIP backbones: find them locally, read them safely, load them strictly.

This module resolves *where* the weights are and dispatches to one reader per format:

(a) an OpenCLIP pretrained tag (`openai`, `laion2b_s34b_b79k`, ...), resolved through open_clip's
    pretrained registry to a file that must already be in a local cache (the `cache_dir` given,
    the Hugging Face hub cache, or open_clip's URL cache `~/.cache/clip`). Nothing is downloaded
    unless `XMODAL_ALLOW_DOWNLOAD=1` is set and `HF_HUB_OFFLINE` is not;
(b) an OpenAI checkpoint file (`ViT-B-32.pt`): a TorchScript archive or a plain state dict
    (`backbones/openai.py`);
(c) an OpenCLIP state dict `.safetensors` / `.bin` / `.pt` / `.pth`, possibly wrapped as
    `{"state_dict": ...}` with DDP `module.` prefixes, or a directory holding one
    (`backbones/openclip_checkpoint.py`);
(d) a Hugging Face `CLIPModel` directory (`backbones/hf_model.py`);
plus `xmodal` (the packaged xmodal-tiny weights) and `random` (random weights, explicitly asked for).

Security: no code from a weights file ever runs. Files are read by `backbones/weight_file.py`:
safetensors headers are checked against the file, pickles go through the restricted unpickler of
`xmodal.safe_pickle` (tensors and plain containers only), and TorchScript archives are taken
apart as zips, never passed to `torch.jit.load` (which runs the archive's code).

Activation: OpenAI weights were trained with QuickGELU while open_clip's `ViT-B-32` config uses
nn.GELU. The activation is set to what the source says (a tag's `quick_gelu` flag, the modules of
a TorchScript archive, a HF config's `hidden_act`, xmodal's safetensors metadata, or OpenAI's
layout in a plain state dict); otherwise the architecture's own is kept. Either way the
description and `weights_info["activation"]` say which one runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, Union

import open_clip
import torch
from torch import nn

from xmodal.backbones import openai as openai_format
from xmodal.backbones.activation import (
    activation_name,
    describe as describe_activation,
    set_quick_gelu,
    uses_quick_gelu,
)
from xmodal.backbones.hf_model import (
    HF_CONFIG_NAME,
    HF_WEIGHT_NAMES,
    architecture_dims,
    check_hf_config,
    contained_file,
    hf_config_for,
    hf_to_openclip,
    openclip_to_hf,
    read_hf_config,
    read_hf_directory,
    save_hf_clip,
)
from xmodal.backbones.openai import OPENAI_META_KEYS
from xmodal.backbones.openclip_checkpoint import (
    ACTIVATION_META,
    OPENCLIP_BIN_NAME,
    OPENCLIP_SAFE_NAME,
    WRAPPER_PREFIXES,
    activation_from_metadata,
    check_tensors,
    refuse_hf_weights,
    save_openclip_checkpoint,
    strip_prefixes,
    unwrap,
)
from xmodal.backbones.weight_file import (
    CONTAINER_SAFETENSORS,
    CONTAINER_TORCHSCRIPT,
    read_weight_file,
)
from xmodal.errors import WeightsNotFoundError, XModalError

STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

KIND_FILE = "file"  # one checkpoint file: OpenCLIP/OpenAI state dict or TorchScript archive
KIND_HF = "hf_clip"  # a Hugging Face CLIPModel directory

#: `pretrained=` values that are not tags or paths
EMBEDDED_TAG = "xmodal"  # weights shipped inside the package (the project's own small CLIP, see its MODEL_CARD.md)
RANDOM_TAG = "random"  # random initialisation, explicitly asked for
EMBEDDED = {"xmodal-tiny": Path(__file__).resolve().parent.parent / "assets" / "xmodal-tiny" / "model.safetensors"}

#: weights_info["format"] values
FORMAT_TAG = "openclip-tag"
FORMAT_OPENAI_TORCHSCRIPT = openai_format.FORMAT_TORCHSCRIPT
FORMAT_OPENAI_STATE_DICT = openai_format.FORMAT_STATE_DICT
FORMAT_OPENCLIP_STATE_DICT = "openclip-state-dict"
FORMAT_HF_DIRECTORY = "hf-directory"
FORMAT_PACKAGED = "xmodal-packaged"
FORMAT_RANDOM = "random"
WEIGHTS_INFO_KEYS = ("pretrained", "weights_path", "weights_sha256", "activation", "format")

ORIGIN_PATH, ORIGIN_TAG, ORIGIN_EMBEDDED = "path", "tag", "embedded"


@dataclass(frozen=True)
class WeightSource:
    """Where the weights for one backbone come from, found before the model is built."""

    kind: str  # KIND_FILE or KIND_HF
    path: Path  # the file, or the HF directory
    description: str  # short, user-facing: "openai (local cache: ...)" or the path
    quick_gelu: Optional[bool] = None  # activation the weights were trained with, when the source says
    origin: str = ORIGIN_PATH  # "path" | "tag" | "embedded"
    requested: str = ""  # the tag, "xmodal", or the absolute path the user gave
    activation_reason: str = ""  # why quick_gelu is what it is (for the description)


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
        f"(a) an OpenCLIP tag whose file is already in a local cache (--cache-dir DIR on eval/index/embed or "
        f"model.cache_dir in a run config, the Hugging Face cache ~/.cache/huggingface/hub or ~/.cache/clip; "
        f"{tag_hint}), "
        f"(b) an OpenAI checkpoint file (--pretrained /path/{name}.pt, TorchScript archive or plain state dict), "
        f"(c) an OpenCLIP state dict (--pretrained /path/{OPENCLIP_SAFE_NAME}, or a .bin/.pt/.pth file), "
        f"(d) a Hugging Face CLIPModel directory with config.json and model.safetensors or pytorch_model.bin "
        f"(--pretrained /path/clip-vit-base-patch32/). "
        f"Weights are not downloaded unless XMODAL_ALLOW_DOWNLOAD=1 is set and HF_HUB_OFFLINE is not "
        f"(docs/DATA.md, 'Weights')."
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
        real = path.resolve()
        quick, reason = _hub_file_activation(name, real)
        return WeightSource(KIND_FILE, real, str(real), quick_gelu=quick, requested=str(path.absolute()),
                            activation_reason=reason)
    if _looks_like_path(text):
        raise weights_not_found(name, text, f"{path} does not exist")
    return _resolve_tag(name, text, cache_dir, download)


def _resolve_embedded(name: str) -> WeightSource:
    path = EMBEDDED.get(name)
    if path is None:
        raise XModalError(
            f"pretrained={EMBEDDED_TAG!r} is the project's own embedded model and exists only for "
            f"{sorted(EMBEDDED)}; for {name} give an OpenCLIP tag or a checkpoint path"
        )
    if not path.is_file():
        raise weights_not_found(name, EMBEDDED_TAG, f"the packaged file {path} is missing (reinstall xmodal)")
    return WeightSource(KIND_FILE, path, f"{EMBEDDED_TAG} (embedded {name}, {path.name})",
                        origin=ORIGIN_EMBEDDED, requested=EMBEDDED_TAG)


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or os.sep in text
        or text.startswith(("~", "."))
        or text.lower().endswith(STATE_DICT_SUFFIXES)
    )


def _resolve_directory(name: str, text: str, path: Path) -> WeightSource:
    requested = str(path.absolute())
    path = path.resolve()
    for fname in (OPENCLIP_SAFE_NAME, OPENCLIP_BIN_NAME):
        if (path / fname).is_file():
            file = contained_file(path, fname, path)
            quick, reason = _hub_file_activation(name, file.resolve())
            return WeightSource(KIND_FILE, file, str(file), quick_gelu=quick, requested=requested,
                                activation_reason=reason)
    if (path / HF_CONFIG_NAME).is_file():
        if any((path / w).is_file() for w in HF_WEIGHT_NAMES):
            return WeightSource(KIND_HF, path, f"{path} (Hugging Face CLIPModel)", requested=requested)
        raise weights_not_found(
            name, text, f"{path} has {HF_CONFIG_NAME} but none of {', '.join(HF_WEIGHT_NAMES)}"
        )
    raise weights_not_found(
        name,
        text,
        f"directory {path} holds neither {OPENCLIP_SAFE_NAME}/{OPENCLIP_BIN_NAME} nor a Hugging Face "
        f"{HF_CONFIG_NAME} with model weights",
    )


def _hub_file_activation(name: str, path: Path) -> Tuple[Optional[bool], str]:
    """A file inside the hub cache folder of one of `name`'s OpenCLIP tags takes that tag's activation."""
    parts = set(path.parts)
    for tag in open_clip.list_pretrained_tags_by_model(name):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        hub = cfg.get("hf_hub", "")
        if hub:
            repo = "/".join(hub.split("/")[:2])
            if "models--" + repo.replace("/", "--") in parts:
                return bool(cfg.get("quick_gelu", False)), f"as OpenCLIP tag {tag} ({repo}, whose hub cache holds the file) was trained"
    return None, ""


def _resolve_tag(name: str, tag: str, cache_dir: Optional[str], download: Optional[bool]) -> WeightSource:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        known = ", ".join(tags) if tags else "none (it is not an OpenCLIP release)"
        raise XModalError(
            f"pretrained={tag!r} is neither an existing file/directory nor an OpenCLIP tag of {name}; "
            f"tags of {name}: {known}. Pass a tag, a path to a checkpoint file or CLIPModel directory, "
            f"or {RANDOM_TAG!r} for random weights."
        )
    quick = bool(cfg.get("quick_gelu", False))
    why = f"as OpenCLIP tag {tag} was trained"
    candidates = tag_cache_candidates(cfg, cache_dir)
    for cand in candidates:
        if cand.is_file():
            return WeightSource(KIND_FILE, cand, f"{tag} (local cache: {cand})", quick_gelu=quick,
                                origin=ORIGIN_TAG, requested=tag, activation_reason=why)
    if download is None:
        download = download_allowed()
    if download:
        try:
            target = open_clip.pretrained.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as exc:  # hub clients raise many types; the user sees one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise weights_not_found(name, tag, f"download failed ({type(exc).__name__}: {first[:200]})") from None
        if target and Path(target).is_file():
            return WeightSource(KIND_FILE, Path(target), f"{tag} (downloaded: {target})", quick_gelu=quick,
                                origin=ORIGIN_TAG, requested=tag, activation_reason=why)
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
    fmt: str  # "safetensors" | "torchscript" | "pickle" (the container)
    quick_gelu: Union[None, bool, Dict[str, bool]] = None
    openai: Optional[str] = None  # why this is an OpenAI checkpoint, or None
    sha256: str = ""
    activation_reason: str = ""


_CONTAINER_NAMES = {CONTAINER_SAFETENSORS: "safetensors", CONTAINER_TORCHSCRIPT: "torchscript"}


def read_checkpoint(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Dict[str, object]]:
    """Read one checkpoint file safely into a flat state dict (wrappers and prefixes removed).

    Returns (state_dict, info) with info = {"format" ("safetensors"|"pickle"|"torchscript"),
    "quick_gelu" (bool, {'vision'|'text': bool} or None), "openai" (bool), "sha256"}.
    """
    read = _read_file(Path(path))
    info = {"format": read.fmt, "quick_gelu": read.quick_gelu, "openai": read.openai is not None, "sha256": read.sha256}
    return read.state_dict, info


def _read_file(path: Path) -> _Read:
    raw = read_weight_file(path)
    fmt = _CONTAINER_NAMES.get(raw.container, "pickle")
    if raw.container == CONTAINER_TORCHSCRIPT:
        sd, quick = openai_format.archive_state_dict(raw.contents)
        sd = openai_format.drop_meta(sd)
        reason = "" if quick is None else "the archive's MLP modules are " + (
            ("QuickGELU" if quick else "GELU") if isinstance(quick, bool) else "per tower as set")
        return _Read(sd, fmt, quick, "a TorchScript archive", raw.sha256, reason)
    if raw.container == CONTAINER_SAFETENSORS:
        sd = strip_prefixes(raw.contents)
        quick = activation_from_metadata(raw.metadata)
        reason = "recorded in the file's metadata by xmodal" if quick is not None else ""
    else:
        sd = strip_prefixes(unwrap(raw.contents, path))
        quick, reason = None, ""
    refuse_hf_weights(sd, path)
    evidence = openai_format.openai_evidence(list(sd)) if raw.container != CONTAINER_SAFETENSORS else (
        openai_format.openai_evidence([k for k in sd if k in OPENAI_META_KEYS]))
    sd = openai_format.drop_meta(sd)
    check_tensors(sd, path)
    if quick is None and evidence:
        quick, reason = True, f"OpenAI weights ({evidence}); every OpenAI CLIP uses QuickGELU"
    return _Read(sd, fmt, quick, evidence, raw.sha256, reason)


# -------------------------------------------------------------------------- loading
@dataclass
class LoadedWeights:
    """What `load_weights` did: a one-line description and the provenance dict (`weights_info`)."""

    description: str
    info: Dict[str, object]


def random_weights_info(clip: nn.Module) -> Dict[str, object]:
    """`weights_info` of a randomly initialised backbone."""
    return {"pretrained": RANDOM_TAG, "weights_path": None, "weights_sha256": None,
            "activation": activation_name(clip), "format": FORMAT_RANDOM}


def load_weights(
    clip: nn.Module,
    name: str,
    pretrained: Union[str, os.PathLike, WeightSource],
    cache_dir: Optional[str] = None,
) -> LoadedWeights:
    """Load weights into an already-built open_clip CLIP; return the description and `weights_info`.

    Strict: any missing or unexpected key or shape mismatch raises XModalError naming the file,
    the architecture and the first offending keys; the model is untouched in that case.
    """
    source = resolve_pretrained(name, pretrained, cache_dir=cache_dir)
    if source.kind == KIND_HF:
        config = read_hf_config(source.path)
        quick = check_hf_config(clip, config, str(source.path / HF_CONFIG_NAME), name)
        hf_state, sha256, _ = read_hf_directory(source.path)
        state = hf_to_openclip(hf_state, str(source.path))
        del hf_state
        fmt, label, reason = FORMAT_HF_DIRECTORY, "", "from config.json hidden_act"
    else:
        read = _read_file(source.path)
        state, sha256 = read.state_dict, read.sha256
        quick, reason = read.quick_gelu, read.activation_reason
        if source.quick_gelu is not None:  # the tag (or the hub repo holding the file) says
            quick, reason = source.quick_gelu, source.activation_reason or "as the OpenCLIP tag was trained"
        if read.fmt == "torchscript":
            fmt, label = FORMAT_OPENAI_TORCHSCRIPT, " (TorchScript archive)"
        elif read.openai:
            fmt, label = FORMAT_OPENAI_STATE_DICT, " (OpenAI state dict)"
        else:
            fmt, label = FORMAT_OPENCLIP_STATE_DICT, ""
        if source.origin == ORIGIN_TAG:
            fmt = FORMAT_TAG
        elif source.origin == ORIGIN_EMBEDDED:
            fmt, label = FORMAT_PACKAGED, ""
    _load_strict(clip, state, source.path, name)
    del state
    changed = set_quick_gelu(clip, quick) if quick is not None else []
    if quick is None and source.origin == ORIGIN_EMBEDDED:
        reason = f"{name}'s own, which the packaged weights were trained with"
    elif quick is None:
        reason = "the architecture's default: the weights do not say which activation they were trained with"
    how = f"set to match the weights: {reason}" if changed else reason
    description = f"{source.description}{label}; activation {describe_activation(clip)} ({how})"
    info = {
        "pretrained": source.requested or str(source.path),
        "weights_path": str(source.path),
        "weights_sha256": sha256,
        "activation": activation_name(clip),
        "format": fmt,
    }
    return LoadedWeights(description, info)


def load_pretrained(
    clip: nn.Module,
    name: str,
    pretrained: Union[str, os.PathLike, WeightSource],
    cache_dir: Optional[str] = None,
) -> str:
    """`load_weights` returning only the one-line description (activation included)."""
    return load_weights(clip, name, pretrained, cache_dir).description


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




__all__ = [
    "WeightSource",
    "LoadedWeights",
    "resolve_pretrained",
    "load_pretrained",
    "load_weights",
    "random_weights_info",
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
    "EMBEDDED_TAG",
    "RANDOM_TAG",
    "WEIGHTS_INFO_KEYS",
    # constants and helpers that lived here before the split, re-exported for existing imports
    "ACTIVATION_META",
    "WRAPPER_PREFIXES",
    "OPENAI_META_KEYS",
    "OPENCLIP_SAFE_NAME",
    "OPENCLIP_BIN_NAME",
    "HF_CONFIG_NAME",
    "HF_WEIGHT_NAMES",
    "KIND_FILE",
    "KIND_HF",
]
