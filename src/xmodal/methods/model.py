"""AdaptedModel: one frozen backbone carrying named methods, one active at a time.

The peft `PeftModel` of xmodal: `add_method` builds a method for this backbone,
`set_active` detaches the current one and attaches another (no backbone reload),
`disable_adapters()` runs the frozen backbone (MSTA's frozen branch, zero-shot baselines).
Several methods at once on different towers are ONE method, `compose` (methods/compose.py).
A similarity head with weights (CLIP4Clip's seq_transformer) is bound with `use_head`: its
module joins the trainable set and the adapter checkpoint (`head_module`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Tuple

import torch
from torch import nn

from xmodal.backbones.dual_encoder import DualEncoder
from xmodal.errors import XModalError
from xmodal.methods.base import Method, MethodConfig
from xmodal.methods.registry import get_method_class


class AdaptedModel(nn.Module):
    def __init__(self, backbone: DualEncoder):
        super().__init__()
        self.backbone = backbone
        self.methods = nn.ModuleDict()
        self.active: Optional[str] = None
        self.head_module: Optional[nn.Module] = None
        self.head_settings: Optional[dict] = None  # pooling etc. of the head the module belongs to
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

    # --------------------------------------------------------------------- head
    def use_head(self, head):
        """Bind a similarity head's weights to this model (seq_transformer; others pass through).

        The weights come from a loaded adapter when it saved a head of the same pooling, or
        are built fresh; either way they train with the adapter and are saved with it.
        Returns the head.
        """
        if not getattr(head, "trained", False):
            return head
        settings = {"pooling": head.pooling}
        if self.head_module is None or self.head_settings != settings:
            with self.disable_adapters():  # CLIP4Clip's init copies the frozen text blocks
                module = head.build(self.backbone)
            ref = next(iter(self.backbone.parameters()))
            self.set_head_module(module.to(device=ref.device), settings)
        head.module = self.head_module
        return head

    def load_head_state(self, settings: Optional[dict], state: dict, source: str = "") -> None:
        """Restore a trained head saved with an adapter (its weights, then `use_head` binds them)."""
        from xmodal.engine.heads import SimilarityHead
        from xmodal.methods.base import check_state_shapes

        pooling = (settings or {}).get("pooling")
        if not isinstance(settings, dict) or not state:
            raise XModalError(f"{source}: the checkpoint has a similarity head without "
                              f"{'its tensors' if settings else 'its settings'}; save the adapter again")
        head = SimilarityHead(pooling) if pooling in ("seq_transformer",) else None
        if head is None:
            raise XModalError(f"{source}: similarity_head.pooling={pooling!r} is not a trained pooling")
        module = head.build(self.backbone)
        check_state_shapes(module.state_dict(), state, source)
        module.load_state_dict(state, strict=True)
        module.initialised_from = "checkpoint"
        ref = next(iter(self.backbone.parameters()))
        self.set_head_module(module.to(device=ref.device), {"pooling": pooling})

    def set_head_module(self, module: nn.Module, settings: dict) -> None:
        module.train(self.training)
        module.requires_grad_(True)
        self.head_module = module
        self.head_settings = dict(settings)

    def trainable_state(self) -> dict:
        """What is trained: the active method's tensors and a bound trained head's (`similarity_head.*`)."""
        from xmodal.methods.checkpoint import HEAD_PREFIX

        state = dict(self.method.trainable_state(self.backbone)) if self.method is not None else {}
        if self.head_module is not None:
            state.update({HEAD_PREFIX + k: v.detach() for k, v in self.head_module.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict, source: str = "") -> None:
        """Inverse of `trainable_state` on this model as built (resume): method, then head."""
        from xmodal.methods.base import check_state_shapes
        from xmodal.methods.checkpoint import HEAD_PREFIX

        state = dict(state)
        head = {k[len(HEAD_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(HEAD_PREFIX)]}
        if self.method is None:
            raise XModalError(f"{source}: the model has no active method to load the state into")
        self.method.load_trainable_state(state, self.backbone, source=source)
        if head or self.head_module is not None:
            if self.head_module is None:
                raise XModalError(f"{source}: the state holds a similarity head's tensors but this model has no "
                                  f"trained head bound (head.pooling differs from the saved run's?)")
            check_state_shapes(self.head_module.state_dict(), head, f"{source} [similarity head]")
            self.head_module.load_state_dict(head, strict=True)

    # --------------------------------------------------------------- parameters
    def trainable_parameters(self) -> List[nn.Parameter]:
        head = list(self.head_module.parameters()) if self.head_module is not None else []
        if self.method is None:
            return head
        seen, out = set(), []
        for p in [*self.method.trainable_parameters(self.backbone), *head]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def named_trainable_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        ids = {id(p) for p in self.trainable_parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) in ids]

    def parameter_counts(self) -> Tuple[int, int]:
        """(trainable, total) where total = backbone + the active method's (and head's) own tensors."""
        report = self.parameter_report()
        return report["trainable"], report["total"]

    def parameter_report(self) -> dict:
        """Counts and both percentages: xmodal's (of backbone + method) and the papers'.

        The papers divide by the backbone WITHOUT the adapter; MSTA's also leaves out the text
        token-embedding table (`paper_denominator` of the method class). `percent_paper` uses
        the method's denominator, named in `paper_denominator`.
        """
        trainable = sum(p.numel() for p in self.trainable_parameters())
        backbone = sum(p.numel() for p in self.backbone.parameters())
        extra = sum(p.numel() for p in self.method.parameters()) if self.method is not None else 0
        if self.head_module is not None:
            extra += sum(p.numel() for p in self.head_module.parameters())
        token_table = self.backbone.text_tower.token_embedding.weight.numel()
        denominators = {"backbone": backbone, "backbone_without_token_embedding": backbone - token_table}
        kind = getattr(self.method, "paper_denominator", "backbone") if self.method is not None else "backbone"
        total = backbone + extra
        return {
            "trainable": trainable, "total": total, "backbone": backbone,
            "backbone_without_token_embedding": backbone - token_table,
            "percent": 100.0 * trainable / total if total else 0.0,
            "paper_denominator": kind,
            "percent_paper": 100.0 * trainable / denominators[kind] if denominators[kind] else 0.0,
        }

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
