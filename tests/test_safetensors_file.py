"""Byte-reproducible safetensors: the adapter's recorded sha256 must not depend on the process.

`safetensors` writes its metadata map in a per-call order, so the demo printed a different adapter
sha256 from run to run although every tensor was identical.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from xmodal.methods import make_config, apply_method
from xmodal.safetensors_file import canonical_header, safetensors_bytes, save_safetensors, write_safetensors

META = {f"key{i}": f"value {i}" for i in range(6)}


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(7, generator=g).half(),
            "c.steps": torch.arange(4)}


def _header(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")
    assert n % 8 == 0
    return json.loads(data[8:8 + n])


def test_adapter_file_bytes_repeat(tiny_backbone_factory, tmp_path):
    model = apply_method(tiny_backbone_factory(0), make_config("cross_modal_adapter"))
    blobs = set()
    for i in range(10):
        model.save_adapter(tmp_path / f"a{i}")
        blobs.add((tmp_path / f"a{i}" / "adapter_model.safetensors").read_bytes())
    assert len(blobs) == 1


def test_same_input_same_bytes_and_sorted_metadata():
    blobs = {safetensors_bytes(_tensors(), META) for _ in range(10)}
    assert len(blobs) == 1
    header = _header(blobs.pop())
    assert list(header["__metadata__"]) == sorted(META)


@pytest.mark.parametrize("writer", ["file", "atomic"])
def test_written_file_loads_unchanged(tmp_path, writer):
    path = tmp_path / "t.safetensors"
    if writer == "file":
        save_safetensors(_tensors(), path, META)
    else:
        write_safetensors(path, _tensors(), META)
    assert path.read_bytes() == safetensors_bytes(_tensors(), META)
    loaded = load_file(str(path))
    for k, v in _tensors().items():
        assert torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == META


def test_header_of_another_length_is_rewritten_whole():
    """A header whose canonical form differs in length (here: padded by a foreign writer) still loads."""
    raw = save(_tensors(), metadata=META)
    n = int.from_bytes(raw[:8], "little")
    padded = raw[8:8 + n] + b" " * 16
    foreign = len(padded).to_bytes(8, "little") + padded + raw[8 + n:]
    fixed = canonical_header(foreign)
    assert fixed == safetensors_bytes(_tensors(), META)


def test_no_metadata_keeps_none(tmp_path):
    data = safetensors_bytes(_tensors())
    assert "__metadata__" not in _header(data)
