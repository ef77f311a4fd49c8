"""Several methods active at once, each on its own tower(s): one method, one checkpoint.

MV-Adapter's comparison pairs each vision-only baseline (ST-Adapter, Convpass, AdaptFormer)
with a text-side AdaptMLP; a run config says so with

    method:
      name: compose
      methods:
        - {name: st_adapter}
        - {name: adaptformer, towers: [text]}

`towers` is the part's `modalities` field (methods without one adapt a fixed tower and refuse
it); `preset` works per part. Parts attach in order and detach in reverse; their hooks add up.
The trainable set is the union of the parts' (the parameter count is their sum), the
checkpoint stores each part's tensors under `parts.<i>.` and its config in the one
adapter_config.json, auxiliary losses add up, and at most one part may prefix the text.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from xmodal.errors import XModalError
from xmodal.methods.base import Method, MethodConfig, register
from xmodal.methods.registry import config_from_dict, get_method_class


def _part_config(entry: Any, index: int) -> MethodConfig:
    where = f"compose.methods[{index}]"
    if not isinstance(entry, dict):
        raise XModalError(f"{where}: expected a mapping like {{name: adaptformer, towers: [text]}}, got {entry!r}")
    entry = dict(entry)
    name = entry.pop("name", None) or entry.pop("method", None)
    if not name:
        raise XModalError(f"{where}: missing 'name' (a registered method)")
    if name == "compose":
        raise XModalError(f"{where}: compose cannot contain compose; list the methods in one list")
    towers = entry.pop("towers", None)
    if towers is not None:
        cls = get_method_class(name).config_class
        if "modalities" not in {f.name for f in fields(cls)}:
            raise XModalError(f"{where}: method {name!r} adapts a fixed tower and has no 'towers'/'modalities' choice")
        towers = [towers] if isinstance(towers, str) else list(towers)
        entry["modalities"] = towers[0] if len(towers) == 1 else "both" if sorted(towers) == ["text", "vision"] else towers
    return config_from_dict({"method": name, **entry}, source=where)


@dataclass
class ComposeConfig(MethodConfig):
    method = "compose"
    #: one mapping per part: {name, [towers], [preset], **fields}; stored fully resolved. The
    #: default is one of MV-Adapter's baseline pairs: ST-Adapter (vision) + AdaptMLP (AdaptFormer) on text
    methods: Tuple[Dict[str, Any], ...] = ({"name": "st_adapter"}, {"name": "adaptformer", "towers": ["text"]})

    def __post_init__(self):
        if not self.methods:
            raise XModalError("compose: field 'methods' must list at least one method")
        self.methods = tuple(_part_config(e, i).to_dict() for i, e in enumerate(self.methods))

    def part_configs(self) -> List[MethodConfig]:
        return [config_from_dict(dict(d), source=f"compose.methods[{i}]") for i, d in enumerate(self.methods)]


@register
class Compose(Method):
    name = "compose"
    config_class = ComposeConfig

    def __init__(self, config: ComposeConfig, backbone):
        super().__init__(config, backbone)
        self.parts = nn.ModuleList(get_method_class(c.method)(c, backbone) for c in config.part_configs())
        prefixed = [p.name for p in self.parts if p.tokenize_prefix()]
        if len(prefixed) > 1:
            raise XModalError(f"compose: {prefixed} all put prompt tokens at the start of the text; at most one may")

    @property
    def identity_at_init(self) -> bool:  # type: ignore[override]
        return all(p.identity_at_init for p in self.parts)

    def attach(self, backbone) -> None:
        done = []
        try:
            for part in self.parts:
                part.attach(backbone)
                part.attached = True
                done.append(part)
        except BaseException:
            for part in reversed(done):
                part.detach(backbone)
            raise

    def detach(self, backbone) -> None:
        for part in reversed(self.parts):
            if part.attached:
                part.detach(backbone)
        super().detach(backbone)

    def trainable_parameters(self, backbone) -> List[nn.Parameter]:
        return [p for part in self.parts for p in part.trainable_parameters(backbone)]

    def trainable_state(self, backbone) -> Dict[str, torch.Tensor]:
        return {f"parts.{i}.{k}": v for i, part in enumerate(self.parts)
                for k, v in part.trainable_state(backbone).items()}

    def load_trainable_state(self, state: Dict[str, torch.Tensor], backbone, source: str = "") -> None:
        split: List[Dict[str, torch.Tensor]] = [{} for _ in self.parts]
        for key, value in state.items():
            head, _, rest = key.partition(".")
            index, _, name = rest.partition(".")
            if head != "parts" or not index.isdigit() or int(index) >= len(self.parts):
                raise XModalError(f"{source}: tensor {key!r} belongs to no part of this composition "
                                  f"({len(self.parts)} parts: {[p.name for p in self.parts]})")
            split[int(index)][name] = value
        for part, part_state in zip(self.parts, split):
            part.load_trainable_state(part_state, backbone, source=f"{source} [{part.name}]")

    def extra_loss(self, model, batch, outputs) -> Optional[torch.Tensor]:
        terms = [t for t in (p.extra_loss(model, batch, outputs) for p in self.parts) if t is not None]
        return sum(terms) if terms else None

    def tokenize_prefix(self) -> str:
        return next((p.tokenize_prefix() for p in self.parts if p.tokenize_prefix()), "")


__all__ = ["ComposeConfig", "Compose"]
