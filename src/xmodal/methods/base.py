"""What every parameter-efficient method shares: config, registry, hooks, layer selection.

Modelled on peft's tuners: one dataclass config per method, one `Method` module per
method that owns its trainable tensors, a registry by name. A method never forks CLIP: it
attaches forward hooks (open_clip's `ls_1`/`ls_2` identity modules sit exactly where
sequential adapters go) or swaps/unfreezes backbone tensors, and `detach` undoes all of it,
so one frozen backbone can carry many methods and switch between them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import nn

from xmodal.backbones.dual_encoder import MODALITIES, TEXT, VISION, DualEncoder
from xmodal.errors import XModalError

if TYPE_CHECKING:
    from xmodal.methods.model import AdaptedModel

LayerSpec = Union[str, int, Sequence[int]]


# --------------------------------------------------------------------------- config
@dataclass
class MethodConfig:
    """Base of every method's config. Subclasses set `method` and add their fields."""

    method: ClassVar[str] = ""

    def to_dict(self) -> Dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config") -> "MethodConfig":
        data = dict(data)
        name = data.pop("method", cls.method)
        if name != cls.method:
            raise XModalError(f"{source}: method {name!r} does not match config class for {cls.method!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise XModalError(
                f"{source}: unknown field(s) {unknown} for method {cls.method!r}; expected some of {sorted(known)}"
            )
        for f in dataclasses.fields(cls):  # JSON turns tuples into lists
            if f.name in data and isinstance(data[f.name], list) and isinstance(f.default, tuple):
                data[f.name] = tuple(data[f.name])
        return cls(**data)

    def replace(self, **changes) -> "MethodConfig":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------- registry
# The registry lives in its own module (no import circle base <-> model <-> checkpoint);
# these names stay importable from here.
from xmodal.methods.registry import (  # noqa: E402,F401
    REGISTRY, config_from_dict, get_method_class, list_methods, make_config, register,
)


# ------------------------------------------------------------------- layer helpers
def select_layers(spec: LayerSpec, num_layers: int, field_name: str = "layers") -> List[int]:
    """Resolve a layer spec to sorted block indices.

    "all" | "none" | "first:N" | "last:N" | "N:M" (python slice) | int (last N if negative,
    first N if positive) | explicit list of indices (negative indices count from the end).
    """
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(num_layers))
        if s == "none":
            return []
        if s.startswith("first:") or s.startswith("last:"):
            kind, _, n = s.partition(":")
            k = int(n)
            if not 0 <= k <= num_layers:
                raise XModalError(f"{field_name}={spec!r}: N must be in [0, {num_layers}]")
            return list(range(k)) if kind == "first" else list(range(num_layers - k, num_layers))
        if ":" in s:
            a, _, b = s.partition(":")
            return list(range(num_layers))[slice(int(a) if a else None, int(b) if b else None)]
        raise XModalError(f"{field_name}={spec!r}: expected all, none, first:N, last:N, A:B or a list")
    if isinstance(spec, int):
        return select_layers(f"first:{spec}" if spec >= 0 else f"last:{-spec}", num_layers, field_name)
    out = []
    for i in spec:
        j = i + num_layers if i < 0 else i
        if not 0 <= j < num_layers:
            raise XModalError(f"{field_name}: layer {i} out of range for a tower of {num_layers} blocks")
        out.append(j)
    return sorted(set(out))


def map_layer(index: int, num_layers: int, num_slots: int, mode: str = "proportional") -> Optional[int]:
    """Map block `index` of a tower with `num_layers` blocks onto `num_slots` shared slots.

    Towers of different depth (ViT-L/14: 24 vision vs 12 text blocks) share weights through
    this map: "proportional" sends block i to slot floor(i * slots / layers) (two vision
    blocks per text block for ViT-L); "top" aligns the last blocks and returns None below.
    """
    if num_layers == num_slots:
        return index
    if mode == "proportional":
        return (index * num_slots) // num_layers
    if mode == "top":
        j = index - (num_layers - num_slots)
        return j if j >= 0 else None
    raise XModalError(f"layer_map={mode!r}: expected 'proportional' or 'top'")


# ------------------------------------------------------------------------ hooks
def _output_hook(fn: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module, args, output):
        return output + fn(output)

    return hook


class _InputTap:
    """Remembers the input of a module (ln_1 / ln_2) for a parallel adapter in the same block."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = None

    def __call__(self, module, args):
        self.value = args[0]


def hook_block(block: nn.Module, position: str, fn: Callable[[torch.Tensor], torch.Tensor], form: str = "sequential"):
    """Add `fn`'s output to a residual branch of an open_clip ResidualAttentionBlock.

    position "attn" -> branch after attention (`ls_1`), "ffn" -> after the MLP (`ls_2`).
    form "sequential": delta = fn(branch output)  (Houlsby / Cross-Modal Adapter);
    form "parallel":   delta = fn(block input of that branch) (AdaptFormer, He et al.);
    form "parallel_normed": delta = fn(LayerNorm output feeding that branch) (Convpass);
    form "block_parallel" (position "block"): out = block(x) + fn(x), the adapter parallel to
    the WHOLE block, reading the block's input (MSTA: E_j(x) + lambda * A_j(x)).
    Returns the hook handles (remove them to detach).
    """
    if form == "block_parallel":
        if position not in ("block", None):
            raise XModalError(f"form='block_parallel' adapts the whole block: position must be 'block', got {position!r}")
        return hook_block_parallel(block, fn)
    if position not in ("attn", "ffn"):
        raise XModalError(f"position={position!r}: expected 'attn' or 'ffn'")
    ls, ln = {"attn": ("ls_1", "ln_1"), "ffn": ("ls_2", "ln_2")}[position]
    if form == "sequential":
        return [getattr(block, ls).register_forward_hook(_output_hook(fn))]
    if form in ("parallel", "parallel_normed"):
        tap = _InputTap()
        if form == "parallel_normed":
            tap_hook = getattr(block, ln).register_forward_hook(lambda m, a, out: setattr(tap, "value", out))
        else:
            tap_hook = getattr(block, ln).register_forward_pre_hook(tap)

        def add_parallel(module, args, output):
            x, tap.value = tap.value, None
            return output + fn(x)

        return [tap_hook, getattr(block, ls).register_forward_hook(add_parallel)]
    raise XModalError(f"form={form!r}: expected 'sequential', 'parallel', 'parallel_normed' or 'block_parallel'")


def hook_block_parallel(block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
    """out = block(x) + fn(x): a pre-hook keeps the block input x (positional, or open_clip's
    `q_x` keyword), a forward hook adds fn(x) to the block output. A stack, not one slot, so a
    block re-entered (nested calls) still pairs each output with its own input."""
    inputs: List[torch.Tensor] = []

    def keep(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["q_x"])

    def add(module, args, kwargs, output):
        return output + fn(inputs.pop())

    return [block.register_forward_pre_hook(keep, with_kwargs=True),
            block.register_forward_hook(add, with_kwargs=True)]


def rewrite_block_input(block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Pre-hook: the block's input x (positional, or open_clip's `q_x` keyword) becomes fn(x)."""

    def pre(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, dict(kwargs, q_x=fn(kwargs["q_x"]))

    return [block.register_forward_pre_hook(pre, with_kwargs=True)]


def hook_block_input(block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]):
    """x -> x + fn(x) at the entry of a block, before its attention (ST-Adapter's position)."""
    return rewrite_block_input(block, lambda x: x + fn(x))


def patch_grid(num_tokens: int, prefix: int = 1) -> int:
    """Side of the square patch grid of a ViT token sequence (CLS first)."""
    side = int(round((num_tokens - prefix) ** 0.5))
    if side * side != num_tokens - prefix:
        raise XModalError(f"{num_tokens - prefix} patch tokens do not form a square grid")
    return side


# ------------------------------------------------------------------------ method
class Method(nn.Module):
    """One parameter-efficient method instance bound to a backbone's shapes.

    Subclasses set `name`, `config_class`, build their tensors in `__init__` from the
    backbone's shapes (without modifying it) and implement `attach`. Hooks registered
    through `self.add_handles` are removed by `detach`; backbone state changed in
    `attach` is restored by callbacks registered with `self.on_detach`.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[Optional[type]] = None
    #: whether the method leaves the frozen backbone's outputs unchanged at initialisation
    identity_at_init: ClassVar[bool] = True
    #: what the method's paper divides its trainable count by: "backbone" (without the adapter)
    #: or "backbone_without_token_embedding" (MSTA); see AdaptedModel.parameter_report
    paper_denominator: ClassVar[str] = "backbone"

    def __init__(self, config: MethodConfig, backbone: DualEncoder):
        super().__init__()
        self.config = config
        self._handles: List[Any] = []
        self._undo: List[Callable[[], None]] = []
        self.attached = False

    # -- lifecycle
    def attach(self, backbone: DualEncoder) -> None:
        raise NotImplementedError

    def add_handles(self, handles: Iterable[Any]) -> None:
        self._handles.extend(handles)

    def on_detach(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def detach(self, backbone: DualEncoder) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()
        self.attached = False

    # -- what trains and what is saved
    def trainable_parameters(self, backbone: DualEncoder) -> List[nn.Parameter]:
        """Parameters the optimiser updates (default: everything this module owns)."""
        return list(self.parameters())

    def trainable_state(self, backbone: DualEncoder) -> Dict[str, torch.Tensor]:
        """Tensors stored in the adapter-only checkpoint (default: this module's state)."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def load_trainable_state(self, state: Dict[str, torch.Tensor], backbone: DualEncoder, source: str = "") -> None:
        own = self.state_dict()
        check_state_shapes(own, state, source)
        self.load_state_dict(state, strict=True)

    # -- optional extras used by the engine
    def extra_loss(self, model: "AdaptedModel", batch: Dict[str, Any], outputs: Dict[str, Any]) -> Optional[torch.Tensor]:
        """An auxiliary loss term (e.g. MSTA's consistency loss); None if the method has none."""
        return None

    def tokenize_prefix(self) -> str:
        """Text prepended to every caption before tokenising (CoOp-style context slots)."""
        return ""


def check_state_shapes(expected: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor], source: str = "") -> None:
    """Refuse a checkpoint whose tensor names or shapes differ, saying which."""
    where = f"{source}: " if source else ""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        raise XModalCheckpointError(
            f"{where}tensor names do not match the method built on this backbone; "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in expected.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise XModalCheckpointError(
                f"{where}tensor {k!r} has shape {tuple(got[k].shape)} in the checkpoint but "
                f"{tuple(v.shape)} on this backbone"
            )


from xmodal.errors import CheckpointMismatchError as XModalCheckpointError  # noqa: E402


def modalities_of(spec: Union[str, Sequence[str]]) -> List[str]:
    """"both" | "vision" | "text" | list -> list of modalities."""
    if isinstance(spec, str):
        if spec == "both":
            return list(MODALITIES)
        spec = [spec]
    for m in spec:
        if m not in MODALITIES:
            raise XModalError(f"modalities: {m!r} is not one of {list(MODALITIES)} or 'both'")
    return list(spec)


__all__ = [
    "MethodConfig", "Method", "REGISTRY", "register", "get_method_class", "config_from_dict", "make_config",
    "select_layers", "map_layer", "hook_block", "hook_block_parallel", "hook_block_input", "list_methods", "rewrite_block_input", "patch_grid", "check_state_shapes", "modalities_of", "VISION", "TEXT",
    "MODALITIES", "field",
]
