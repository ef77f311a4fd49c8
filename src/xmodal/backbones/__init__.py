"""Backbones: OpenCLIP architectures by name, pretrained weights, and the DualEncoder wrapper.

Exports are resolved lazily so that importing a light submodule (e.g. `context`) or running
`xmodal --help` does not import open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "create_backbone": "xmodal.backbones.factory",
    "list_architectures": "xmodal.backbones.factory",
    "DualEncoder": "xmodal.backbones.dual_encoder",
    "load_pretrained": "xmodal.backbones.weights",
    "resolve_pretrained": "xmodal.backbones.weights",
    "save_openclip_checkpoint": "xmodal.backbones.weights",
    "load_weights": "xmodal.backbones.weights",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'xmodal.backbones' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
