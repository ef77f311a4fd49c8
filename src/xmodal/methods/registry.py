"""The method registry: name -> `Method` class, and config dicts -> config dataclasses.

Kept apart from `base.py` (what a method is) and `model.py` (the wrapper that carries
methods) so that neither imports the other at import time: `checkpoint.py` and the engine
only need this module to turn a saved or YAML config into a dataclass. Method modules are
imported lazily, the first time a name is looked up.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Dict, List

from xmodal.errors import XModalError

REGISTRY: Dict[str, type] = {}

#: one module per method; each registers itself on import
METHOD_MODULES = [
    "full_finetune", "partial", "projection",
    "cross_modal_adapter", "uni_adapter", "adaptformer", "adapter_attn", "lora",
    "mv_adapter", "msta", "st_adapter", "convpass",
    "coop", "vpt", "vl_prompt", "maple", "compose",
]
_loaded = False


def register(cls):
    """Class decorator: make a `Method` subclass available by `cls.name`."""
    if not cls.name or cls.config_class is None:
        raise TypeError(f"{cls.__name__} needs `name` and `config_class`")
    if cls.config_class.method != cls.name:
        raise TypeError(f"{cls.__name__}: config_class.method {cls.config_class.method!r} != name {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def load_method_modules() -> None:
    """Import every method module once (each registers itself)."""
    global _loaded
    if _loaded:
        return
    here = Path(__file__).resolve().parent
    for name in METHOD_MODULES:
        if (here / f"{name}.py").exists():
            importlib.import_module(f"xmodal.methods.{name}")
    _loaded = True


def list_methods() -> List[str]:
    load_method_modules()
    return sorted(REGISTRY)


def get_method_class(name: str) -> type:
    load_method_modules()
    try:
        return REGISTRY[name]
    except KeyError:
        raise XModalError(f"unknown method {name!r}; registered: {sorted(REGISTRY)}") from None


def config_from_dict(data: Dict[str, Any], source: str = "config"):
    """A config dataclass from {"method": name, [preset: name], **fields} (fields win over the preset)."""
    if not isinstance(data, dict) or "method" not in data:
        raise XModalError(f"{source}: missing key 'method' (one of {list_methods()})")
    data = dict(data)
    preset = data.pop("preset", None)
    cls = get_method_class(data["method"])
    if preset is not None:
        from xmodal.methods.presets import preset_fields

        data = {"method": data["method"], **preset_fields(data["method"], preset, source), **data}
    return cls.config_class.from_dict(data, source=source)


def make_config(name: str, preset: str = None, **overrides):
    """`make_config("msta", preset="paper", r=64)`: a method's config (preset, then overrides)."""
    cls = get_method_class(name)
    if preset is not None:
        from xmodal.methods.presets import preset_fields

        overrides = {**preset_fields(name, preset, f"make_config({name!r})"), **overrides}
        return cls.config_class.from_dict({"method": name, **overrides}, source=f"make_config({name!r}, preset={preset!r})")
    return cls.config_class(**overrides)


__all__ = ["REGISTRY", "METHOD_MODULES", "register", "list_methods", "get_method_class", "config_from_dict",
           "make_config", "load_method_modules"]
