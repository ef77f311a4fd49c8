"""Parameter-efficient methods, one file each, all in one registry.

>>> from xmodal.methods import apply_method, make_config
>>> model = apply_method(backbone, make_config("cross_modal_adapter", r=8, d_s=16))
>>> model = apply_method(backbone, make_config("msta", preset="paper"))

Module graph without cycles: `registry` (names -> classes) <- `base` (what a method is) <- the
method modules; `model` (AdaptedModel) imports `base`/`registry`; `checkpoint` imports
`registry` only. `AdaptedModel`/`apply_method` are loaded on first access, so importing
`xmodal.methods.checkpoint` (or any method module) does not import `model`.
"""

from xmodal.methods.base import Method, MethodConfig  # noqa: F401
from xmodal.methods.registry import (  # noqa: F401
    METHOD_MODULES, REGISTRY, config_from_dict, get_method_class, list_methods, load_method_modules, make_config,
    register,
)

_LAZY = {"AdaptedModel": "xmodal.methods.model", "apply_method": "xmodal.methods.model"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xmodal.methods' has no attribute {name!r}")


load_method_modules()
