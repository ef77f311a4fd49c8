"""Baselines that train backbone tensors in place (partial, projection-only, full fine-tuning).

These methods own no new modules: they unfreeze a named subset of the backbone's own
Parameters. To keep the "one frozen backbone, many adapters" contract they swap values,
never Parameter objects (so an optimiser's references stay valid):

- `attach` stashes a clone of the frozen values of the tensors it trains, copies the
  adapter's trained values (if it has any) into them and makes them trainable;
- `detach` copies the current (trained) values into the adapter's store, so switching away
  and back keeps the training result, and restores the frozen values bit-exactly.

Tensors are named by their canonical backbone path (`clip.visual.ln_post.weight`), which is
also their key in the adapter checkpoint.
"""

from __future__ import annotations

import re
import weakref
from typing import Dict, Iterable, List

import torch
from torch import nn
from torch.nn.utils import parametrize

from xmodal.backbones.dual_encoder import TEXT, VISION, DualEncoder
from xmodal.errors import XModalError
from xmodal.methods.base import Method, MethodConfig, check_state_shapes

# backbone -> the BackboneTuning method whose values it currently carries
_PARAMETRIZED = re.compile(r"\.parametrizations\.([^.]+)\.original$")
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, BackboneTuning]" = weakref.WeakKeyDictionary()


def canonical_name(name: str) -> str:
    """Parameter name as if no parametrization (e.g. an attached LoRA) were registered."""
    return _PARAMETRIZED.sub(r".\1", name)


def named_backbone_parameters(backbone: nn.Module) -> Dict[str, nn.Parameter]:
    """{canonical name: Parameter}, stable whether or not a LoRA is attached."""
    return {canonical_name(n): p for n, p in backbone.named_parameters()}


def get_parameter(backbone: nn.Module, name: str) -> nn.Parameter:
    """The backbone Parameter with canonical `name` (looks through parametrizations)."""
    path, _, leaf = name.rpartition(".")
    module = backbone.get_submodule(path) if path else backbone
    if parametrize.is_parametrized(module, leaf):
        return module.parametrizations[leaf].original
    param = module._parameters.get(leaf)
    if param is None:
        raise XModalError(f"backbone has no parameter {name!r}")
    return param


def parameter_names(backbone: nn.Module, params: Iterable[nn.Parameter]) -> List[str]:
    """Canonical names of `params`, in the backbone's own order, without duplicates."""
    wanted = {id(p) for p in params if p is not None}
    return [n for n, p in named_backbone_parameters(backbone).items() if id(p) in wanted]


def tower_parameters(backbone: DualEncoder, modality: str) -> List[nn.Parameter]:
    """Every Parameter of one tower (text: the text tower minus the vision tower and logit scale)."""
    visual = list(backbone.visual.parameters())
    if modality == VISION:
        return visual
    if modality == TEXT:
        skip = {id(p) for p in visual}
        for attr in ("logit_scale", "logit_bias"):
            p = getattr(backbone.clip, attr, None)
            if isinstance(p, nn.Parameter):
                skip.add(id(p))
        return [p for p in backbone.text_tower.parameters() if id(p) not in skip]
    raise XModalError(f"modalities: {modality!r} is not one of ['vision', 'text']")


def head_parameters(backbone: DualEncoder, modality: str, include_ln: bool = True,
                    include_proj: bool = True) -> List[nn.Parameter]:
    """The tensors above a tower's last block: final LayerNorm and output projection."""
    owner = backbone.visual if modality == VISION else backbone.text_tower
    ln_name, proj_name = ("ln_post", "proj") if modality == VISION else ("ln_final", "text_projection")
    out: List[nn.Parameter] = []
    if include_ln:
        ln = getattr(owner, ln_name, None)
        if isinstance(ln, nn.Module):
            out.extend(ln.parameters())
    if include_proj:
        proj = getattr(owner, proj_name, None)
        if isinstance(proj, nn.Parameter):
            out.append(proj)
        elif isinstance(proj, nn.Module):  # e.g. a Linear head on HF text towers
            out.extend(proj.parameters())
    return out


class BackboneTuning(Method):
    """Base of the methods that fine-tune a subset of the backbone's own tensors.

    Subclasses implement `select(backbone) -> list of Parameters` to train.
    """

    def __init__(self, config: MethodConfig, backbone: DualEncoder):
        super().__init__(config, backbone)
        self.tensor_names: List[str] = parameter_names(backbone, self.select(backbone))
        if not self.tensor_names:
            raise XModalError(f"{self.name}: the configuration {config.to_dict()} selects no backbone tensor")
        self._store: Dict[str, torch.Tensor] = {}  # trained values while detached ({}: never trained)
        self._stash: Dict[str, torch.Tensor] = {}  # frozen values while attached

    def select(self, backbone: DualEncoder) -> List[nn.Parameter]:
        raise NotImplementedError

    # ---------------------------------------------------------------- lifecycle
    def attach(self, backbone: DualEncoder) -> None:
        other = _ATTACHED.get(backbone)
        if other is not None and other is not self:
            raise XModalError(f"{self.name}: another backbone-tuning method ({other.name}) is attached; detach it first")
        if self._stash:
            return  # already attached
        with torch.no_grad():
            for name in self.tensor_names:
                p = get_parameter(backbone, name)
                self._stash[name] = p.detach().clone()
                if name in self._store:
                    p.copy_(self._store[name])
                p.requires_grad_(True)
        self._store = {}  # the values live in the backbone now
        _ATTACHED[backbone] = self
        self.attached = True

    def detach(self, backbone: DualEncoder) -> None:
        if self._stash:
            with torch.no_grad():
                for name in self.tensor_names:
                    p = get_parameter(backbone, name)
                    self._store[name] = p.detach().clone()
                    p.copy_(self._stash[name])
                    p.requires_grad_(False)
            self._stash = {}
            if _ATTACHED.get(backbone) is self:
                del _ATTACHED[backbone]
        super().detach(backbone)

    # ----------------------------------------------------------- trained state
    def trainable_parameters(self, backbone: DualEncoder) -> List[nn.Parameter]:
        return [get_parameter(backbone, n) for n in self.tensor_names]

    def _frozen_value(self, backbone: DualEncoder, name: str) -> torch.Tensor:
        other = _ATTACHED.get(backbone)
        if other is not None and name in other._stash:
            return other._stash[name]
        return get_parameter(backbone, name).detach()

    def trainable_state(self, backbone: DualEncoder) -> Dict[str, torch.Tensor]:
        if self._stash:  # attached: the backbone holds this adapter's values
            return {n: get_parameter(backbone, n).detach() for n in self.tensor_names}
        if self._store:
            return dict(self._store)
        return {n: self._frozen_value(backbone, n) for n in self.tensor_names}

    def load_trainable_state(self, state: Dict[str, torch.Tensor], backbone: DualEncoder, source: str = "") -> None:
        params = {n: get_parameter(backbone, n) for n in self.tensor_names}
        check_state_shapes(params, state, source)
        with torch.no_grad():
            if self._stash:
                for n, p in params.items():
                    p.copy_(state[n])
            else:
                self._store = {n: state[n].detach().to(dtype=p.dtype, device=p.device).clone()
                               for n, p in params.items()}

    def _apply(self, fn, *args, **kwargs):
        """Move/cast the stored values along with the module (`.to(device)`, `.half()`)."""
        out = super()._apply(fn, *args, **kwargs)
        self._store = {k: fn(v) for k, v in self._store.items()}
        self._stash = {k: fn(v) for k, v in self._stash.items()}
        return out

    def extra_repr(self) -> str:
        return f"tensors={len(self.tensor_names)}, attached={bool(self._stash)}"


__all__ = [
    "BackboneTuning", "canonical_name", "get_parameter", "head_parameters", "named_backbone_parameters",
    "parameter_names", "tower_parameters",
]
