"""One backbone in memory per set of weights, many adapters on it, switched per request.

Indices built on the same backbone weights (same architecture, same `pretrained`, and for
randomly initialised backbones the same seed) share one `AdaptedModel`; each index's adapter
is loaded onto it once under its own name. A request activates its index's adapter and
encodes while holding that backbone's lock, so two concurrent requests for different adapters
never see each other's adapter (the hooks of `set_active` are global to the backbone).

Why a lock and not per-request copies (measured on xmodal-tiny, CPU time per switch): hook-based
methods switch in well under a millisecond (Cross-Modal Adapter 0.6 ms, AdaptFormer 0.3 ms, VPT
0.05 ms), LoRA in ~32 ms (torch parametrizations are registered and checked on attach) — against
~15 ms for encoding one query; a copy per adapter would cost a whole backbone each (85 MB for
xmodal-tiny, ~600 MB for ViT-B/32) and on CPU the encoder already uses every core, so parallel
encodes only contend. The adapter is switched only when the previous request used another one.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from xmodal.errors import XModalError

#: `pretrained` values that mean "random initialisation" (the seed then decides the weights)
RANDOM_WEIGHTS = (None, "", "random")


def recorded_sha256(meta: Dict[str, Any]) -> Optional[str]:
    """The sha256 of the weights file the gallery was encoded with, where the index recorded it."""
    weights = meta.get("weights") if isinstance(meta.get("weights"), dict) else {}
    return meta.get("weights_sha256") or weights.get("weights_sha256")


def backbone_key(meta: Dict[str, Any]) -> Tuple:
    """What identifies the weights an index was encoded with (indices with equal keys share a backbone)."""
    pretrained = meta.get("pretrained")
    seed = meta.get("seed") if pretrained in RANDOM_WEIGHTS else None
    return (meta.get("backbone"), "random" if pretrained in RANDOM_WEIGHTS else str(pretrained), seed,
            recorded_sha256(meta))


def _create_backbone(name: str, pretrained: Optional[str], seed: Optional[int], device: str):
    """`create_backbone`, asking explicitly for random weights where the index says so."""
    from xmodal.backbones.factory import create_backbone

    if pretrained in RANDOM_WEIGHTS:
        try:
            return create_backbone(name, pretrained="random", device=device, seed=seed)
        except XModalError:  # a library without the explicit "random" tag: None means the same
            return create_backbone(name, pretrained=None, device=device, seed=seed)
    return create_backbone(name, pretrained=pretrained, device=device, seed=seed)


@dataclass
class SharedBackbone:
    """An AdaptedModel, the lock that serialises adapter switch + encode, and its loaded adapters."""

    key: Tuple
    model: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: Dict[str, str] = field(default_factory=dict)  # resolved adapter dir -> adapter name
    switches: int = 0


class Encoder:
    """The query side of one index: its backbone, its adapter (or none), its word budget."""

    def __init__(self, shared: SharedBackbone, adapter_name: Optional[str], max_words: Optional[int]):
        self.shared = shared
        self.adapter_name = adapter_name
        self.max_words = max_words

    @property
    def embed_dim(self) -> int:
        return int(self.shared.model.backbone.embed_dim)

    @property
    def preprocess(self):
        return self.shared.model.backbone.preprocess_val

    def _activate(self) -> None:
        model = self.shared.model
        if model.active != self.adapter_name:
            model.set_active(self.adapter_name)
            self.shared.switches += 1

    def encode_text(self, texts) -> torch.Tensor:
        """(N, D) float32, unnormalised, with this index's adapter active."""
        from xmodal.encoding import encode_texts

        with self.shared.lock:
            self._activate()
            return encode_texts(self.shared.model, list(texts), max_words=self.max_words, progress=False)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (N, 3, H, W) -> (N, D) float32, with this index's adapter active."""
        from xmodal.encoding import encode_images

        with self.shared.lock:
            self._activate()
            return encode_images(self.shared.model, pixels, progress=False)


class ModelRegistry:
    """Builds each distinct backbone once and loads each distinct adapter once onto it."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.backbones: Dict[Tuple, SharedBackbone] = {}
        self._lock = threading.Lock()

    def encoder_for(self, meta: Dict[str, Any], adapter: Optional[Path], where: str) -> Encoder:
        """The Encoder for an index whose gallery.json is `meta` (`where` names it in errors)."""
        from xmodal.methods import AdaptedModel

        if not meta.get("backbone"):
            raise XModalError(f"{where}: missing 'backbone'; rebuild the index with `xmodal index`")
        key = backbone_key(meta)
        with self._lock:
            shared = self.backbones.get(key)
            if shared is None:
                backbone = _create_backbone(meta["backbone"], meta.get("pretrained"), meta.get("seed"), self.device)
                want, got = recorded_sha256(meta), (getattr(backbone, "weights_info", None) or {}).get("weights_sha256")
                if want and got and want != got:  # queries would be encoded by other weights than the gallery
                    raise XModalError(f"{where}: the gallery was encoded with weights sha256 {want[:12]}..., but "
                                      f"{meta.get('pretrained')!r} now has sha256 {got[:12]}...; rebuild the index "
                                      f"or restore those weights")
                shared = SharedBackbone(key=key, model=AdaptedModel(backbone))
                self.backbones[key] = shared
            name = None
            if adapter is not None:
                resolved = os.path.realpath(adapter)
                name = shared.adapters.get(resolved)
                if name is None:
                    name = f"adapter{len(shared.adapters)}"
                    with shared.lock:
                        shared.model.load_adapter(resolved, adapter_name=name, activate=False)
                    shared.adapters[resolved] = name
        return Encoder(shared, name, meta.get("max_words"))
