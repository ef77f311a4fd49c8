"""Files xmodal writes follow the user's umask (mkstemp/mkdtemp alone give 0600/0700, unreadable to
collaborators): metrics and configs of a run, adapters, training checkpoints, indices, plain atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path):
    """(path, mode) of root and everything below it (links excluded)."""
    out = [(root, stat.S_IMODE(root.stat().st_mode))]
    for p in sorted(root.rglob("*")):
        if not p.is_symlink():
            out.append((p, stat.S_IMODE(p.stat().st_mode)))
    return out


def _assert_shared(root: Path):
    for path, mode in _modes(root):
        want = 0o755 if path.is_dir() else 0o644
        assert mode == want, f"{path}: {oct(mode)}, expected {oct(want)} under umask 022"


def test_atomic_helpers_respect_umask(tmp_path, umask_022):
    from xmodal.atomic import atomic_directory, atomic_file, atomic_write_json

    atomic_write_json(tmp_path / "out" / "metrics.json", {"a": 1})
    with atomic_file(tmp_path / "out" / "plot.png") as tmp:
        tmp.write_bytes(b"png")
    with atomic_directory(tmp_path / "out" / "folder") as d:
        (d / "sub").mkdir()
        (d / "sub" / "x.bin").write_bytes(b"x")
    _assert_shared(tmp_path / "out")


def test_adapter_checkpoint_index_respect_umask(tmp_path, umask_022, tiny_backbone):
    from xmodal.engine import checkpoint as ck
    from xmodal.methods import apply_method, make_config
    from xmodal.retrieval_index import GalleryIndex

    model = apply_method(tiny_backbone, make_config("cross_modal_adapter", r=4, d_s=8))
    model.save_adapter(tmp_path / "adapter")
    _assert_shared(tmp_path / "adapter")

    opt = torch.optim.AdamW([p for _, p in model.named_trainable_parameters()], lr=1e-3)
    ck.save_training_checkpoint(tmp_path / "run" / "last", model, opt, {"epoch": 1, "trainer": {"global_step": 1}})
    _assert_shared(tmp_path / "run")

    g = torch.Generator().manual_seed(0)
    index = GalleryIndex(torch.randn(4, 2, 8, generator=g), torch.ones(4, 2, dtype=torch.bool),
                         [f"v{i}" for i in range(4)], [f"/m/{i}.mp4" for i in range(4)], {"backbone": "x"})
    index.save(tmp_path / "index")
    _assert_shared(tmp_path / "index")
