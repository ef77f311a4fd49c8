"""Parameter-efficient methods, one file each, all in one registry.

>>> from xmodal.methods import apply_method, make_config
>>> model = apply_method(backbone, make_config("cross_modal_adapter", r=8, d_s=16))
"""

import importlib
from pathlib import Path

from xmodal.methods.base import (  # noqa: F401
    REGISTRY, Method, MethodConfig, config_from_dict, get_method_class, make_config, register,
)
from xmodal.methods.model import AdaptedModel, apply_method  # noqa: F401

# one module per method; each registers itself on import
METHOD_MODULES = [
    "full_finetune", "partial", "projection",
    "cross_modal_adapter", "uni_adapter", "adaptformer", "adapter_attn", "lora",
    "mv_adapter", "msta", "st_adapter", "convpass",
    "coop", "vpt", "vl_prompt", "maple",
]

_here = Path(__file__).resolve().parent
for _name in METHOD_MODULES:
    if (_here / f"{_name}.py").exists():
        importlib.import_module(f"xmodal.methods.{_name}")


def list_methods():
    return sorted(REGISTRY)
