"""Name -> config -> DualEncoder, as open_clip's factory does, plus our own small configs.

`create_backbone("ViT-B-32")` (or `pretrained="random"`) builds a randomly initialised model;
`pretrained=` takes an OpenCLIP tag, a local checkpoint file/directory, or `"xmodal"` (the packaged
weights), resolved by `xmodal.backbones.weights`. The result carries `weights_info`: where its
weights came from (tag or path, file read, sha256, format) and which MLP activation it runs.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Optional

import open_clip
import torch

from xmodal.backbones.dual_encoder import DualEncoder
from xmodal.errors import XModalError

RANDOM = "random"  # pretrained= value for random weights, explicitly asked for

_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make xmodal's own architectures (xmodal-tiny, xmodal-test) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def list_architectures() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def create_backbone(
    name: str,
    pretrained: Optional[str] = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_dir: Optional[str] = None,
    seed: Optional[int] = None,
) -> DualEncoder:
    """Build architecture `name` and load `pretrained` weights (None or "random": random init).

    `pretrained` may be an OpenCLIP tag (`openai`, `laion2b_s34b_b79k`, ...), a local OpenAI
    / OpenCLIP checkpoint file, a Hugging Face `CLIPModel` directory, or "xmodal". Missing weights
    raise `WeightsNotFoundError` naming the architecture and the four ways to supply them.
    `model.weights_info` = {"pretrained", "weights_path", "weights_sha256", "activation", "format"}.
    """
    register_model_configs()
    if name not in open_clip.list_models():
        raise XModalError(
            f"unknown architecture {name!r}; known: ViT-B-32, ViT-B-16, ViT-L-14, xmodal-tiny, "
            f"xmodal-test and the rest of `open_clip.list_models()`"
        )
    weights = None
    if pretrained is not None and str(pretrained) == RANDOM:
        pretrained = None
    if pretrained is not None and not str(pretrained):
        raise XModalError("pretrained='' is empty: give an OpenCLIP tag, a checkpoint path, 'xmodal' or 'random'")
    if pretrained is not None:
        from xmodal.backbones.weights import resolve_pretrained

        # find the weights before the (slow) build so a missing file fails fast
        weights = resolve_pretrained(name, pretrained, cache_dir=cache_dir)
    if seed is not None:
        torch.manual_seed(seed)
    # open_clip warns "initialized randomly" because xmodal loads the weights itself, below
    with _quiet_root_logger():
        clip, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=None, precision="fp32", device="cpu"
        )
    tokenizer = open_clip.get_tokenizer(name)
    source, info = None, None
    if weights is not None:
        from xmodal.backbones.weights import load_weights

        loaded = load_weights(clip, name, weights, cache_dir=cache_dir)
        source, info = loaded.description, loaded.info
    model = DualEncoder(clip, name, tokenizer, preprocess_train, preprocess_val, pretrained=source, weights_info=info)
    model.requires_grad_(False)
    model.eval()
    if precision in ("fp16", "bf16"):
        model.to(dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    elif precision != "fp32":
        raise ValueError(f"precision must be fp32, fp16 or bf16, got {precision!r}")
    return model.to(device)
