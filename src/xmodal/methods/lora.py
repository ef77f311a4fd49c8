"""LoRA (Hu et al., 2021): low-rank updates W + (alpha/r) * B @ A of the blocks' linear weights.

Targets, per residual block of each selected tower (`target_modules`):
- `attn.in_proj`  -- the fused q/k/v weight `nn.MultiheadAttention.in_proj_weight` (3d x d);
  `qkv` picks which of its q, k, v row blocks get their own (A, B) pair;
- `attn.out_proj` -- the attention output projection;
- `mlp.c_fc`, `mlp.c_proj` -- the two MLP linears.

nn.MultiheadAttention hands `in_proj_weight` and `out_proj.weight` straight to
`F.multi_head_attention_forward`, so no module hook sees those products. LoRA therefore works
in weight space: `torch.nn.utils.parametrize` makes each target weight read as W + delta
while attached. The parametrization holds only a hidden reference to this method, so A/B
never enter the backbone's module tree or parameter count; `detach` removes it with
`leave_parametrized=False`, which puts the very same (untouched) Parameter objects back.

Defaults: r=8, alpha=16 (scale 2), every linear of every block in both towers with q, k and
v all adapted -- the "all linear layers" setting that works best at small rank (LoRA paper
Sec. 7.1, QLoRA). The paper's own setting is `target_modules=("attn.in_proj",), qkv="q,v"`.
A ~ Kaiming-uniform, B = 0, so the model is unchanged at initialisation.

`dropout`: the paper drops the LoRA branch's *input*, which weight-space LoRA cannot reach
inside nn.MultiheadAttention; xmodal drops rank components instead (delta = s * B diag(m) A
with m ~ Bernoulli(1-p)/(1-p), resampled per forward in training mode).

`merge()` folds the update into the weights for inference (no per-forward LoRA cost);
`unmerge()` / `detach` restore the original weights bit-exactly from a saved copy.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from xmodal.backbones.dual_encoder import DualEncoder
from xmodal.errors import XModalError
from xmodal.methods.base import LayerSpec, Method, MethodConfig, modalities_of, register, select_layers

#: per-block weights LoRA can adapt, with (submodule path, tensor name)
TARGETS: Dict[str, Tuple[str, str]] = {
    "attn.in_proj": ("attn", "in_proj_weight"),
    "attn.out_proj": ("attn.out_proj", "weight"),
    "mlp.c_fc": ("mlp.c_fc", "weight"),
    "mlp.c_proj": ("mlp.c_proj", "weight"),
}
_GROUPS = {"attn": ("attn.in_proj", "attn.out_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj")}
_QKV = ("q", "k", "v")


@dataclass
class LoRAConfig(MethodConfig):
    method: ClassVar[str] = "lora"
    #: rank of each update
    r: int = 8
    #: the update is scaled by alpha / r
    alpha: float = 16.0
    #: rank-dropout probability on the update (see module docstring)
    dropout: float = 0.0
    #: names from TARGETS (or the groups "attn", "mlp"), or a regex matched in full against
    #: "attn.in_proj" ... or against the full path "vision.3.attn.in_proj"
    target_modules: Union[str, Tuple[str, ...]] = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
    #: which of q, k, v inside attn.in_proj get an update: "q,k,v", "q,v", ...
    qkv: Union[str, Tuple[str, ...]] = "q,k,v"
    #: "both", "vision" or "text"
    modalities: Union[str, Sequence[str]] = "both"
    #: blocks of each tower that are adapted (see `select_layers`)
    layers: LayerSpec = "all"


class LoRAPair(nn.Module):
    """One low-rank update of an (out x in) weight: B (out x r) @ A (r x in)."""

    def __init__(self, in_features: int, out_features: int, r: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def delta(self, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b = self.lora_B if mask is None else self.lora_B * mask
        return b @ self.lora_A


class _Target:
    """One backbone weight adapted by LoRA (plain object: not part of any module tree)."""

    __slots__ = ("path", "module_path", "tensor_name", "pairs", "rows")

    def __init__(self, path: str, module_path: str, tensor_name: str, pairs: List[Tuple[int, LoRAPair]], rows: int):
        self.path = path  # e.g. "vision.3.attn.in_proj"
        self.module_path = module_path  # e.g. "clip.visual.transformer.resblocks.3.attn"
        self.tensor_name = tensor_name  # "in_proj_weight" | "weight"
        self.pairs = pairs  # [(row block index, pair)]; a plain Linear has one block
        self.rows = rows  # rows of one block


class _LoRAParametrization(nn.Module):
    """Makes a weight read as W + delta. Holds its method by a hidden reference so that
    A/B stay out of the backbone's parameters and state_dict."""

    def __init__(self, method: "LoRA", target: _Target):
        super().__init__()
        object.__setattr__(self, "_method", method)
        object.__setattr__(self, "_target", target)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self._method.delta_weight(self._target, weight)


def _parse_qkv(spec: Union[str, Sequence[str]]) -> List[str]:
    items = [s.strip().lower() for s in (spec.replace(",", " ").split() if isinstance(spec, str) else spec)]
    if len(items) == 1 and len(items[0]) > 1 and set(items[0]) <= set(_QKV):  # "qv"
        items = list(items[0])
    bad = [s for s in items if s not in _QKV]
    if bad or not items:
        raise XModalError(f"lora: qkv={spec!r} must name some of q, k, v (e.g. 'q,v')")
    return [s for s in _QKV if s in items]


def _target_matcher(spec: Union[str, Sequence[str]]):
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise XModalError(f"lora: target_modules={spec!r} is not a valid regular expression ({exc})") from None
        return lambda local, full: bool(pattern.fullmatch(local) or pattern.fullmatch(full))
    names = set()
    for s in spec:
        if s in _GROUPS:
            names.update(_GROUPS[s])
        elif s in TARGETS:
            names.add(s)
        else:
            raise XModalError(
                f"lora: target_modules entry {s!r} is not one of {sorted(TARGETS) + sorted(_GROUPS)} "
                f"(or give one regular expression as a string)"
            )
    return lambda local, full: local in names


@register
class LoRA(Method):
    name = "lora"
    config_class = LoRAConfig
    identity_at_init = True

    def __init__(self, config: LoRAConfig, backbone: DualEncoder):
        super().__init__(config, backbone)
        if not isinstance(config.r, int) or config.r < 1:
            raise XModalError(f"lora: r={config.r!r} must be a positive integer")
        if not 0.0 <= float(config.dropout) < 1.0:
            raise XModalError(f"lora: dropout={config.dropout!r} must be in [0, 1)")
        self.scaling = float(config.alpha) / config.r
        slots = _parse_qkv(config.qkv)
        matches = _target_matcher(config.target_modules)
        prefix = {id(m): n for n, m in backbone.named_modules()}
        self.targets: List[_Target] = []
        for modality in modalities_of(config.modalities):
            blocks = backbone.blocks(modality)
            towers = nn.ModuleDict()
            for i in select_layers(config.layers, len(blocks), "lora: layers"):
                block = blocks[i]
                for local, (sub, tensor_name) in TARGETS.items():
                    full = f"{modality}.{i}.{local}"
                    if not matches(local, full):
                        continue
                    module = block.get_submodule(sub)
                    weight = _original(module, tensor_name)
                    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                        raise XModalError(
                            f"lora: {full} has no 2-D {tensor_name!r} (attention without a fused "
                            f"in_proj_weight is not supported)"
                        )
                    out_f, in_f = weight.shape
                    if local == "attn.in_proj":
                        if out_f % 3:
                            raise XModalError(f"lora: {full}.in_proj_weight has {out_f} rows, expected 3 x width")
                        rows = out_f // 3
                        pairs = [(_QKV.index(s), LoRAPair(in_f, rows, config.r)) for s in slots]
                        group = nn.ModuleDict({_QKV[j]: p for j, p in pairs})
                    else:
                        rows = out_f
                        pairs = [(0, LoRAPair(in_f, out_f, config.r))]
                        group = pairs[0][1]
                    _nest(towers, [str(i)] + local.split("."), group)
                    self.targets.append(_Target(full, prefix[id(module)], tensor_name, pairs, rows))
            if len(towers):
                self.add_module(modality, towers)
        if not self.targets:
            raise XModalError(
                f"lora: target_modules={config.target_modules!r} with layers={config.layers!r} and "
                f"modalities={config.modalities!r} selects no weight; targets are {sorted(TARGETS)}"
            )
        self.merged = False
        self._merged_originals: Dict[str, torch.Tensor] = {}

    # --------------------------------------------------------------- the update
    def delta_weight(self, target: _Target, weight: torch.Tensor) -> torch.Tensor:
        """(alpha/r) * B @ A laid out like `weight` (zeros where q/k/v is not adapted)."""
        p = float(self.config.dropout)
        blocks: List[Optional[torch.Tensor]] = [None] * (weight.shape[0] // target.rows)
        for j, pair in target.pairs:
            mask = None
            if p > 0 and self.training:
                keep = torch.full((1, pair.lora_A.shape[0]), 1.0 - p, device=pair.lora_A.device, dtype=pair.lora_A.dtype)
                mask = torch.bernoulli(keep) / (1.0 - p)
            blocks[j] = pair.delta(mask)
        ref = next(b for b in blocks if b is not None)
        full = torch.cat([b if b is not None else ref.new_zeros(ref.shape) for b in blocks], 0)
        return (full * self.scaling).to(weight.dtype)

    # ---------------------------------------------------------------- lifecycle
    def attach(self, backbone: DualEncoder) -> None:
        if self.attached:
            return
        for t in self.targets:
            module = backbone.get_submodule(t.module_path)
            if parametrize.is_parametrized(module, t.tensor_name):
                self._remove_parametrizations(backbone)
                raise XModalError(
                    f"lora: {t.module_path}.{t.tensor_name} is already parametrized (another LoRA attached?)"
                )
            parametrize.register_parametrization(module, t.tensor_name, _LoRAParametrization(self, t))
        self.attached = True

    def _remove_parametrizations(self, backbone: DualEncoder) -> None:
        for t in self.targets:
            module = backbone.get_submodule(t.module_path)
            plist = getattr(module, "parametrizations", None)
            if plist is None or t.tensor_name not in plist:
                continue
            if any(isinstance(m, _LoRAParametrization) and m._method is self for m in plist[t.tensor_name]):
                parametrize.remove_parametrizations(module, t.tensor_name, leave_parametrized=False)

    def detach(self, backbone: DualEncoder) -> None:
        if self.merged:
            self._restore_merged(backbone)
        else:
            self._remove_parametrizations(backbone)
        super().detach(backbone)

    # ------------------------------------------------------------ merge/unmerge
    def merge(self, backbone: DualEncoder) -> None:
        """Fold the updates into the backbone weights (inference speed); keeps the originals.

        For inference only (A/B get no gradient while merged). Switching adapters or
        `disable_adapters()` detaches, which unmerges; re-attaching reads the update live.
        """
        if not self.attached:
            raise XModalError("lora: merge() needs the adapter to be attached (set_active it first)")
        if self.merged:
            return
        was_training = self.training
        self.eval()  # no rank dropout in the merged weights
        try:
            with torch.no_grad():
                merged = {}
                for t in self.targets:
                    w = _original(backbone.get_submodule(t.module_path), t.tensor_name)
                    merged[t.path] = (w.float() + self.delta_weight(t, w.float())).to(w.dtype)
                self._remove_parametrizations(backbone)
                for t in self.targets:
                    w = _original(backbone.get_submodule(t.module_path), t.tensor_name)
                    self._merged_originals[t.path] = w.detach().clone()
                    w.copy_(merged[t.path])
        finally:
            self.train(was_training)
        self.merged = True

    def unmerge(self, backbone: DualEncoder) -> None:
        """Put the original weights back (bit-exact) and read the update live again."""
        if not self.merged:
            return
        self._restore_merged(backbone)
        self.attached = False
        self.attach(backbone)

    def _restore_merged(self, backbone: DualEncoder) -> None:
        with torch.no_grad():
            for t in self.targets:
                _original(backbone.get_submodule(t.module_path), t.tensor_name).copy_(self._merged_originals[t.path])
        self._merged_originals = {}
        self.merged = False

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._merged_originals = {k: fn(v) for k, v in self._merged_originals.items()}
        return out

    def extra_repr(self) -> str:
        return f"r={self.config.r}, scaling={self.scaling:g}, targets={len(self.targets)}, merged={self.merged}"


def _original(module: nn.Module, tensor_name: str) -> Optional[torch.Tensor]:
    """The stored (unparametrized) tensor `module.<tensor_name>`."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name, None)


def _nest(root: nn.ModuleDict, keys: List[str], leaf: nn.Module) -> None:
    """root[k0][k1]...[kn] = leaf, creating ModuleDicts on the way (state_dict names follow)."""
    node = root
    for k in keys[:-1]:
        if k not in node:
            node[k] = nn.ModuleDict()
        node = node[k]
    node[keys[-1]] = leaf


__all__ = ["LoRAConfig", "LoRA", "LoRAPair", "TARGETS"]
