"""One weights file on disk -> its container's contents, its sha256, or a one-line 'this is not a checkpoint'.

The file is memory-mapped once: its sha256 is computed from the mapping in a worker thread
while the container is parsed, and tensors are views into the mapping (no copy, no second read). The container is recognised by its bytes, not its name:
safetensors (header checked here, tensors bounded by the file), a `torch.save` zip or legacy
stream, or a TorchScript archive (both through `xmodal.safe_pickle`: nothing in the file runs).
Anything else (JSON, a Hugging Face config.json, text, an empty file, random bytes) is named
for what it is, with what to pass instead.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Union

import torch

from xmodal.errors import XModalError
from xmodal.safe_pickle import (
    MalformedFileError,
    is_torchscript_zip,
    is_zip,
    open_zip,
    read_torch_file,
    read_torchscript,
)

CONTAINER_SAFETENSORS = "safetensors"
CONTAINER_TORCH = "torch"  # torch.save, zip or legacy
CONTAINER_TORCHSCRIPT = "torchscript"

#: what to pass instead, appended to "this is not a checkpoint" errors
EXPECTED = (
    "expected a checkpoint: an OpenAI .pt (TorchScript archive or state dict), an OpenCLIP state dict "
    "(.safetensors/.bin/.pt/.pth), or a Hugging Face CLIPModel directory (config.json + model.safetensors)"
)

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself applies
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class NotACheckpointError(XModalError):
    """The file is readable but is not a weights checkpoint (JSON, text, a config ...)."""


@dataclass
class RawFile:
    """A weights file as read: container kind, contents, metadata, sha256 of its bytes."""

    path: Path
    container: str
    contents: Any  # safetensors: {name: tensor}; torch: the saved object; torchscript: ScriptArchive
    sha256: str
    metadata: Dict[str, str] = field(default_factory=dict)  # safetensors __metadata__


def map_file(path: Path):
    """The file's bytes as a private (copy-on-write) memory map: tensors are views into it, no copy.

    Empty files give an empty bytearray (mmap refuses length 0).
    """
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return bytearray()
            return mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as exc:
        raise XModalError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None


class _Sha256InBackground:
    """sha256 of a buffer computed in a worker thread while the caller parses it (hashlib releases the GIL)."""

    def __init__(self, buf):
        self._digest = hashlib.sha256()
        self._thread = threading.Thread(target=self._digest.update, args=(memoryview(buf),), daemon=True)
        self._thread.start()

    def result(self) -> str:
        self._thread.join()
        return self._digest.hexdigest()


def sha256_file(path: Union[str, os.PathLike]) -> str:
    """Streaming sha256 of a file (for files whose tensors are read elsewhere)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_weight_file(path: Union[str, os.PathLike]) -> RawFile:
    """Read `path` once, recognise its container and return its contents. Never runs code from it."""
    path = Path(path)
    if not path.is_file():
        raise XModalError(f"{path}: checkpoint file not found")
    buf = map_file(path)
    hasher = _Sha256InBackground(buf)
    try:
        raw = _parse(path, buf)
    finally:
        digest = hasher.result()
    raw.sha256 = digest
    return raw


def _parse(path: Path, buf) -> RawFile:
    digest = ""  # filled in by read_weight_file
    if is_zip(buf):
        archive = open_zip(buf, str(path))
        if is_torchscript_zip(archive):
            return RawFile(path, CONTAINER_TORCHSCRIPT, read_torchscript(buf, str(path)), digest)
        if not archive.has("data.pkl"):
            raise NotACheckpointError(f"{path}: a zip archive but not a PyTorch checkpoint (no data.pkl); {EXPECTED}")
        return RawFile(path, CONTAINER_TORCH, read_torch_file(buf, str(path)), digest)
    if _looks_like_safetensors(buf) or path.suffix == ".safetensors":
        tensors, meta = parse_safetensors(buf, path)
        return RawFile(path, CONTAINER_SAFETENSORS, tensors, digest, meta)
    if buf[:1] == b"\x80":  # pickle protocol 2+: the legacy torch.save stream, or a plain pickle
        return RawFile(path, CONTAINER_TORCH, read_torch_file(buf, str(path)), digest)
    raise NotACheckpointError(f"{path}: {describe_non_checkpoint(buf)}; {EXPECTED}")


def _looks_like_safetensors(buf) -> bool:
    if len(buf) < 10:
        return False
    n = int.from_bytes(buf[:8], "little")
    return 2 <= n <= len(buf) - 8 and buf[8:9] == b"{"


def parse_safetensors(buf, path: Path):
    """({name: tensor view into buf}, metadata) after checking the header against the file."""

    def bad(why: str) -> MalformedFileError:
        return MalformedFileError(f"{path}: not a readable safetensors file ({why}); the file is truncated or corrupt")

    if len(buf) < 8:
        raise bad(f"{len(buf)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(buf[:8], "little")
    if n > min(SAFETENSORS_MAX_HEADER, len(buf) - 8):
        raise bad(f"header declares {n} bytes in a {len(buf)}-byte file")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise bad(f"header is not JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise bad("__metadata__ is not a string-to-string object")
    base = 8 + n
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if dtype is None:
            raise bad(f"tensor {name!r} has unsupported dtype {str(entry.get('dtype'))[:16]!r}")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise bad(f"tensor {name!r} has an invalid shape")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise bad(f"tensor {name!r} has invalid data_offsets")
        numel = 1
        for s in shape:
            numel *= s
        begin, end = offsets
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end or end - begin != numel * itemsize:
            raise bad(f"tensor {name!r} of shape {shape} needs {numel * itemsize} bytes, its offsets span {end - begin}")
        spans.append((begin, end, name, dtype, shape, numel))
    spans.sort()
    position = 0
    for begin, end, name, *_ in spans:
        if begin != position:
            raise bad(f"tensor {name!r} starts at byte {begin}, expected {position} (overlapping or gapped data)")
        position = end
    if base + position != len(buf):
        raise bad(f"tensor data ends at byte {base + position} but the file has {len(buf)}")
    tensors = {}
    for begin, end, name, dtype, shape, numel in spans:
        if numel == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=numel, offset=base + begin).view(shape)
    return tensors, meta


def describe_non_checkpoint(buf) -> str:
    """What a file that is not a checkpoint is, in a few words (content is never echoed)."""
    if len(buf) == 0:
        return "the file is empty (0 bytes), not a checkpoint"
    head = bytes(buf[:4096]).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] in (b"{", b"["):
        try:
            obj = json.loads(bytes(buf).decode("utf-8")) if len(buf) < 64 * 1024 * 1024 else None
        except (ValueError, RecursionError):  # not UTF-8, not JSON, absurdly nested
            obj = None
        if isinstance(obj, dict) and ("weight_map" in obj):
            return ("a Hugging Face weight index (JSON); pass the directory that holds it, its config.json and "
                    "the shards it lists")
        if isinstance(obj, dict) and ({"text_config", "vision_config", "architectures", "model_type"} & set(obj)):
            return ("a Hugging Face config.json, not weights; pass the directory that holds it together with "
                    "model.safetensors or pytorch_model.bin (--pretrained DIR)")
        if obj is not None:
            return f"a JSON file ({len(buf)} bytes), not a checkpoint"
    try:
        text = bytes(buf[:65536]).decode("utf-8")
        printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
        if printable >= 0.95 * max(1, len(text)):
            return f"a text file ({len(buf)} bytes), not a checkpoint"
    except UnicodeDecodeError:
        pass
    return (f"not a checkpoint in any format xmodal reads (safetensors, PyTorch zip or pickle, TorchScript "
            f"archive): {len(buf)} bytes starting with 0x{bytes(buf[:8]).hex()}")


__all__ = [
    "RawFile",
    "NotACheckpointError",
    "read_weight_file",
    "parse_safetensors",
    "sha256_file",
    "describe_non_checkpoint",
    "CONTAINER_SAFETENSORS",
    "CONTAINER_TORCH",
    "CONTAINER_TORCHSCRIPT",
]
