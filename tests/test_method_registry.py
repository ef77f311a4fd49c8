"""No import circle between methods/base, methods/model and methods/checkpoint; old import paths work."""

import subprocess
import sys


def _fresh(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_checkpoint_and_base_do_not_import_model():
    out = _fresh("import sys, xmodal.methods.checkpoint, xmodal.methods.base, xmodal.methods.msta; "
                 "print('xmodal.methods.model' in sys.modules)")
    assert out == "False"


def test_public_import_paths():
    from xmodal.methods import AdaptedModel, apply_method, config_from_dict, list_methods, make_config  # noqa: F401
    from xmodal.methods import base, registry
    from xmodal.methods.model import AdaptedModel as direct

    assert AdaptedModel is direct
    assert base.REGISTRY is registry.REGISTRY and base.config_from_dict is registry.config_from_dict
    assert base.register is registry.register and base.make_config is registry.make_config
    assert "compose" in list_methods() and "msta" in base.REGISTRY
