"""AdaptedModel: one frozen backbone carrying named methods, one active at a time.

The peft `PeftModel` of xmodal: `add_method` builds a method for this backbone,
`set_active` detaches the current one and attaches another (no backbone reload),
`disable_adapters()` runs the frozen backbone (MSTA's frozen branch, zero-shot baselines).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from xmodal.backbones.dual_encoder import DualEncoder
from xmodal.errors import XModalError
from xmodal.methods.base import Method, MethodConfig, get_method_class


class AdaptedModel(nn.Module):
    def __init__(self, backbone: DualEncoder):
        super().__init__()
        self.backbone = backbone
        self.methods = nn.ModuleDict()
        self.active: Optional[str] = None
        backbone.requires_grad_(False)
        self.train(backbone.training)  # eval unless the caller says otherwise (dropout off)

    # ------------------------------------------------------------------ methods
    def add_method(self, config: MethodConfig, adapter_name: str = "default", activate: bool = True) -> Method:
        if adapter_name in self.methods:
            raise XModalError(f"an adapter named {adapter_name!r} is already loaded")
        cls = get_method_class(config.method)
        method = cls(config, self.backbone)
        ref = next(iter(self.backbone.parameters()))
        method.to(device=ref.device)
        method.requires_grad_(False)
        method.train(self.training)
        self.methods[adapter_name] = method
        if activate:
            self.set_active(adapter_name)
        return method

    @property
    def method(self) -> Optional[Method]:
        return self.methods[self.active] if self.active is not None else None

    def set_active(self, adapter_name: Optional[str]) -> None:
        """Switch adapters on the same backbone; None leaves the bare backbone."""
        if adapter_name is not None and adapter_name not in self.methods:
            raise XModalError(f"no adapter named {adapter_name!r}; loaded: {list(self.methods)}")
        if self.active is not None:
            current = self.methods[self.active]
            for p in current.trainable_parameters(self.backbone):
                p.requires_grad_(False)
            current.detach(self.backbone)
        self.active = None
        if adapter_name is not None:
            method = self.methods[adapter_name]
            method.attach(self.backbone)
            method.attached = True
            for p in method.trainable_parameters(self.backbone):
                p.requires_grad_(True)
            self.active = adapter_name

    def delete_method(self, adapter_name: str) -> None:
        if self.active == adapter_name:
            self.set_active(None)
        del self.methods[adapter_name]

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the frozen backbone inside this block (the active method is re-attached after)."""
        name = self.active
        if name is None:
            yield
            return
        method = self.methods[name]
        method.detach(self.backbone)
        try:
            yield
        finally:
            method.attach(self.backbone)
            method.attached = True

    # --------------------------------------------------------------- parameters
    def trainable_parameters(self) -> List[nn.Parameter]:
        if self.method is None:
            return []
        seen, out = set(), []
        for p in self.method.trainable_parameters(self.backbone):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def named_trainable_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        ids = {id(p) for p in self.trainable_parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) in ids]

    def parameter_counts(self) -> Tuple[int, int]:
        """(trainable, total) where total = backbone + the active method's own tensors."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        backbone = sum(p.numel() for p in self.backbone.parameters())
        extra = sum(p.numel() for p in self.method.parameters()) if self.method is not None else 0
        return trainable, backbone + extra

    # ----------------------------------------------------------------- encoding
    def tokenize(self, texts, max_words: Optional[int] = None) -> torch.Tensor:
        prefix = self.method.tokenize_prefix() if self.method is not None else ""
        if prefix:
            texts = [texts] if isinstance(texts, str) else texts
            texts = [f"{prefix} {t}" for t in texts]
            if max_words is not None:
                max_words += len(prefix.split())
        return self.backbone.tokenize(texts, max_words=max_words)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_text(tokens)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_image(images)

    def encode_video(self, video: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.backbone.encode_video(video, frame_mask)

    def encode_visual(self, pixels: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.backbone.encode_visual(pixels, frame_mask)

    def forward(self, tokens: torch.Tensor, pixels: torch.Tensor, frame_mask: Optional[torch.Tensor] = None):
        return self.encode_text(tokens), self.encode_visual(pixels, frame_mask)

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.backbone.logit_scale

    # -------------------------------------------------------------- checkpoints
    def save_adapter(self, directory, adapter_name: Optional[str] = None) -> None:
        from xmodal.methods.checkpoint import save_adapter

        save_adapter(self, directory, adapter_name)

    def load_adapter(self, directory, adapter_name: Optional[str] = None, activate: bool = True) -> Method:
        from xmodal.methods.checkpoint import load_adapter

        return load_adapter(self, directory, adapter_name, activate=activate)


def apply_method(backbone: DualEncoder, config: MethodConfig, adapter_name: str = "default") -> AdaptedModel:
    """`get_peft_model` for xmodal: wrap a backbone and attach one method."""
    model = AdaptedModel(backbone)
    model.add_method(config, adapter_name)
    return model
