"""Byte-reproducible safetensors files: the same tensors and metadata always give the same bytes.

`safetensors` writes its `__metadata__` map from a Rust HashMap, so a file with two or more
metadata keys comes out in a different key order from call to call (and process to process).
The tensors are identical, but the file's sha256 -- which xmodal records as the provenance of
weights and adapters -- is not. Here the header is rewritten with the metadata keys sorted; the
tensor entries keep the library's (deterministic) order and their data offsets, and the header
keeps the format's 8-byte padding, so any safetensors reader loads the file unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional

import torch

from xmodal.atomic import PathLike, atomic_file

METADATA_KEY = "__metadata__"


def canonical_header(data: bytes) -> bytes:
    """`data` (a whole safetensors file) with its metadata keys sorted; tensors untouched."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    ordered: Dict[str, object] = {}
    meta = header.pop(METADATA_KEY, None)
    if meta:
        ordered[METADATA_KEY] = {k: meta[k] for k in sorted(meta)}
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def _cpu(tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


def safetensors_bytes(tensors: Mapping[str, torch.Tensor], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """The safetensors serialisation of `tensors` (moved to CPU), identical for identical input."""
    from safetensors.torch import save

    return canonical_header(save(_cpu(tensors), metadata=dict(metadata) if metadata else None))


def save_safetensors(tensors: Mapping[str, torch.Tensor], file: PathLike,
                     metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write a byte-reproducible safetensors file at `file` (a temp path the caller swaps in).

    The library streams the tensors to disk; only the header is then rewritten, in place when its
    length is unchanged (sorting keys does not change it), so a 600 MB checkpoint is not copied.
    """
    from safetensors.torch import save_file

    file = Path(file)
    save_file(_cpu(tensors), str(file), metadata=dict(metadata) if metadata else None)
    with open(file, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        head = f.read(n)
        fixed = canonical_header(len(head).to_bytes(8, "little") + head)
        if len(fixed) == 8 + n:
            f.seek(0)
            f.write(fixed)
            return file
    data = file.read_bytes()
    file.write_bytes(canonical_header(data))
    return file


def write_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write `tensors` atomically to `path` as a byte-reproducible safetensors file."""
    path = Path(path)
    with atomic_file(path) as tmp:
        save_safetensors(tensors, tmp, metadata)
    return path


__all__ = ["canonical_header", "save_safetensors", "safetensors_bytes", "write_safetensors"]
