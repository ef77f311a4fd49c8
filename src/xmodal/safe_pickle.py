"""The one restricted unpickler of xmodal, and the readers of PyTorch archives built on it.

No file a user gives us may run code. Pickle runs code by design (any global can be called),
and `torch.jit.load` runs the TorchScript an archive carries (a scripted `__setstate__` runs at
load time). So every pickle is read by `RestrictedUnpickler`, which resolves only the globals
its caller allows, and PyTorch archives are taken apart by hand:

- `read_torch_file(data, path)`: what `torch.save` writes (zip archive or the legacy stream),
  tensors rebuilt from their storages after checking sizes, offsets and strides;
- `read_torchscript(data, path)`: a `torch.jit.save` archive (OpenAI's released `.pt` files).
  Its `__torch__.*` classes become inert `ScriptObject` stand-ins that only hold their state;
  which attributes are parameters and buffers is read from the class declarations in `code/`
  as text (never executed), which reproduces `torch.jit.load(f).state_dict()` exactly.

Zip entries are validated before use: names (no absolute paths, no `..`, one top folder, no
links), declared sizes against the file size (zip bombs), storage sizes against tensor shapes.
Every refusal is one `XModalError` line naming the file.
"""

from __future__ import annotations

import ast
import builtins
import collections
import io
import pickle
import re
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from xmodal.errors import XModalError

Buffer = Union[bytes, bytearray, memoryview]


class UnsafeFileError(XModalError):
    """A file would need code execution (or a hostile structure) to load; it is refused."""


class MalformedFileError(XModalError):
    """A file is not the container it claims to be (truncated, corrupt, inconsistent)."""


#: pickles larger than this are not unpickled (real data.pkl records are a few hundred KiB)
MAX_PICKLE_BYTES = 256 * 1024 * 1024
#: non-storage zip entries (pickles, code, version) may not declare more than this in total
MAX_METADATA_BYTES = 512 * 1024 * 1024

# ---------------------------------------------------------------- the unpickler
# containers only: bytes(n)/bytearray(n)/int-taking constructors would let a pickle allocate at will
PLAIN_BUILTINS = ("dict", "list", "str", "tuple", "set", "frozenset")


class ScriptObject:
    """Inert stand-in for a TorchScript class instance: remembers its class name and state, runs nothing."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    @property
    def state(self) -> Any:
        return self.__dict__.get("_state")

    def __repr__(self) -> str:
        return f"<ScriptObject {self.qualname}>"


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only `allowed[(module, name)]`; every other global is refused.

    `script_objects=True` maps `__torch__.*` classes (TorchScript) to `ScriptObject` subclasses.
    """

    def __init__(self, file, allowed: Mapping[Tuple[str, str], Any], *,
                 persistent_load: Optional[Callable[[Any], Any]] = None, script_objects: bool = False):
        super().__init__(file)
        self._allowed = allowed
        self._script_objects = script_objects
        self._classes: Dict[str, type] = {}
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self._allowed:
            return self._allowed[key]
        if self._script_objects and (module == "__torch__" or module.startswith("__torch__.")):
            qual = f"{module}.{name}"
            if qual not in self._classes:
                self._classes[qual] = type(name, (ScriptObject,), {"qualname": qual, "__module__": __name__})
            return self._classes[qual]
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


class _MemoryFile(io.RawIOBase):
    """A read-only, seekable file over a buffer, without copying it (io.BytesIO would)."""

    def __init__(self, data: Buffer):
        super().__init__()
        self._view = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        out = bytes(self._view[self._pos:end])
        self._pos = max(self._pos, end)
        return out

    def readline(self, size: int = -1) -> bytes:
        end = len(self._view)
        limit = end if size is None or size < 0 else min(end, self._pos + size)
        chunk = bytes(self._view[self._pos:limit])
        cut = chunk.find(b"\n")
        if cut >= 0:
            chunk = chunk[:cut + 1]
        self._pos += len(chunk)
        return chunk

    def readinto(self, b) -> int:
        chunk = self.read(len(b))
        b[:len(chunk)] = chunk
        return len(chunk)


def restricted_loads(data: Buffer, allowed: Optional[Mapping[Tuple[str, str], Any]] = None, **kw) -> Any:
    """Unpickle `data` allowing only `allowed` globals (default: plain builtin containers).

    Raises `pickle.UnpicklingError` (or ValueError/EOFError for garbage); callers word the message.
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise pickle.UnpicklingError(f"pickle of {len(data)} bytes exceeds the {MAX_PICKLE_BYTES}-byte limit")
    if allowed is None:
        allowed = builtin_globals(PLAIN_BUILTINS)
    return RestrictedUnpickler(_MemoryFile(data), allowed, **kw).load()


def builtin_globals(names: Iterable[str]) -> Dict[Tuple[str, str], Any]:
    """{("builtins", n): builtins.n} (also under `__builtin__`, as protocol-0/2 pickles from Python 2 name it)."""
    out = {}
    for n in names:
        out[("builtins", n)] = getattr(builtins, n)
        out[("__builtin__", n)] = getattr(builtins, n)
    return out


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode`, which protocol-2 pickles use to rebuild bytes; only for str -> bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError("_codecs.encode is only allowed on (str, 'latin1')")
    return text.encode(encoding)


# --------------------------------------------------------------- tensor rebuild
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


@dataclass(frozen=True)
class StorageType:
    """What `torch.FloatStorage` & co. unpickle to: only a dtype."""

    name: str
    dtype: torch.dtype


class _Storage:
    """A storage read from the archive: a flat tensor of `numel` elements."""

    __slots__ = ("flat", "key")

    def __init__(self, flat: torch.Tensor, key: str):
        self.flat = flat
        self.key = key


def _check_ints(value: Any, what: str) -> Tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of ints, got {type(value).__name__}")
    if any(v < 0 for v in value):
        raise pickle.UnpicklingError(f"tensor {what} {tuple(value)} has negative entries")
    return tuple(value)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """`torch._utils._rebuild_tensor_v2` with checks: the view must lie inside its storage."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage of this file")
    if metadata:
        raise pickle.UnpicklingError("tensors with extra metadata (conjugate/negative bits, attributes) are not supported")
    (offset,) = _check_ints(storage_offset, "storage offset")
    size = _check_ints(size, "size")
    stride = _check_ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
    numel = storage.flat.numel()
    extent = 0 if 0 in size else 1 + sum((s - 1) * st for s, st in zip(size, stride))
    if offset + extent > numel:
        raise pickle.UnpicklingError(
            f"tensor of size {size}, stride {stride} at offset {offset} needs {offset + extent} elements "
            f"but its storage {storage.key} holds {numel}"
        )
    view_numel = 1
    for s in size:
        view_numel *= s
    if view_numel > max(64 * numel, 1 << 20):
        raise pickle.UnpicklingError(
            f"tensor of size {size} (stride {stride}) would present {view_numel} elements of a {numel}-element storage"
        )
    if extent == 0:
        return torch.empty(size, dtype=storage.flat.dtype)
    return storage.flat.as_strided(size, stride, offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    if not torch.is_tensor(data):
        raise pickle.UnpicklingError("parameter rebuilt from something that is not a tensor")
    return data  # a state dict needs the values, not the nn.Parameter wrapper


def _identity(value, *args):
    return value


def tensor_globals(script: bool = False) -> Dict[Tuple[str, str], Any]:
    """The globals a weights pickle may use: tensor rebuilders, storage types, plain containers."""
    allowed: Dict[Tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
    }
    allowed.update(builtin_globals(("set", "frozenset", "slice", "complex")))
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = StorageType(name, dtype)
    if script:  # typed containers in TorchScript pickles carry a type tag; the value is what matters
        for name in ("restore_type_tag", "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"):
            allowed[("torch.jit._pickle", name)] = _identity
    return allowed


# -------------------------------------------------------------------- zip files
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


@dataclass
class _Zip:
    path: str
    data: Buffer
    zf: zipfile.ZipFile
    prefix: str  # the single top folder, with its slash
    entries: Dict[str, zipfile.ZipInfo] = field(default_factory=dict)  # relative name -> info

    def has(self, name: str) -> bool:
        return name in self.entries

    def read_small(self, name: str, limit: int = MAX_PICKLE_BYTES) -> bytes:
        info = self.entries[name]
        if info.file_size > limit:
            raise UnsafeFileError(f"{self.path}: zip entry {info.filename} declares {info.file_size} bytes (limit {limit})")
        try:
            return self.zf.read(info)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError) as exc:
            raise MalformedFileError(f"{self.path}: zip entry {info.filename} is corrupt ({exc})") from None

    def stored_view(self, name: str, check_crc: bool = False) -> memoryview:
        """The bytes of a stored (uncompressed) entry, as a view into the file buffer (no copy).

        Tensor data is not CRC-checked (as torch.load does not); the file's sha256 is recorded instead.
        """
        info = self.entries[name]
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise UnsafeFileError(
                f"{self.path}: tensor data {info.filename} is compressed (PyTorch stores tensor data uncompressed)"
            )
        start = info.header_offset
        header = bytes(self.data[start:start + _LOCAL_HEADER.size])
        if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise MalformedFileError(f"{self.path}: zip entry {info.filename} has no local header")
        fields = _LOCAL_HEADER.unpack(header)
        begin = start + _LOCAL_HEADER.size + fields[9] + fields[10]
        end = begin + info.file_size
        if end > len(self.data):
            raise MalformedFileError(f"{self.path}: zip entry {info.filename} runs past the end of the file (truncated?)")
        view = memoryview(self.data)[begin:end]
        if check_crc and zlib.crc32(view) != info.CRC:
            raise MalformedFileError(f"{self.path}: zip entry {info.filename} fails its CRC check (corrupt file)")
        return view


def open_zip(data: Buffer, path: str) -> _Zip:
    """Open and validate a PyTorch zip archive held in memory."""
    try:
        zf = zipfile.ZipFile(_MemoryFile(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, struct.error) as exc:
        raise MalformedFileError(f"{path}: not a readable zip archive ({exc}); the file is truncated or corrupt") from None
    if not infos:
        raise MalformedFileError(f"{path}: empty zip archive (expected a PyTorch archive with data.pkl)")
    tops = set()
    seen = set()
    declared_meta = 0
    for info in infos:
        name = info.filename
        parts = name.split("/")
        if (name.startswith(("/", "\\")) or "\\" in name or "\x00" in name or ".." in parts
                or re.match(r"^[A-Za-z]:", name)):
            raise UnsafeFileError(f"{path}: zip entry name {name!r} is absolute or leaves the archive folder")
        if name in seen:
            raise UnsafeFileError(f"{path}: zip entry {name!r} appears twice")
        seen.add(name)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise UnsafeFileError(f"{path}: zip entry {name!r} is a symbolic link")
        if info.file_size < 0 or info.compress_size < 0 or info.header_offset + info.compress_size > len(data):
            raise UnsafeFileError(f"{path}: zip entry {name!r} declares data beyond the end of the file")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise UnsafeFileError(f"{path}: zip entry {name!r} declares {info.file_size} bytes but stores {info.compress_size}")
        else:
            declared_meta += info.file_size
        tops.add(parts[0] if len(parts) > 1 else "")
    if declared_meta > min(MAX_METADATA_BYTES, 100 * len(data)):
        raise UnsafeFileError(
            f"{path}: compressed zip entries declare {declared_meta} bytes in a {len(data)}-byte file (zip bomb?)"
        )
    if len(tops) != 1 or "" in tops:
        raise MalformedFileError(f"{path}: a PyTorch archive has one top folder, this zip has {sorted(tops)[:4]}")
    prefix = tops.pop() + "/"
    entries = {i.filename[len(prefix):]: i for i in infos}
    return _Zip(path, data, zf, prefix, entries)


def _zip_storage_loader(archive: _Zip, folder: str) -> Callable[[Any], Any]:
    """persistent_load for archives: ('storage', type, key, location, numel) -> _Storage (checked)."""
    cache: Dict[str, _Storage] = {}

    def load(pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unexpected persistent reference {str(pid)[:80]}")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, StorageType):
            raise pickle.UnpicklingError("storage reference without a storage type")
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_]+", key):
            raise pickle.UnpicklingError(f"storage key {str(key)[:40]!r} is not a plain name")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise pickle.UnpicklingError(f"storage {key} has an invalid element count")
        if key in cache:
            st = cache[key]
            if st.flat.dtype != stype.dtype or st.flat.numel() != numel:
                raise pickle.UnpicklingError(f"storage {key} is referenced with two different types or sizes")
            return st
        name = f"{folder}/{key}"
        if not archive.has(name):
            raise pickle.UnpicklingError(f"storage {name} is referenced but not in the archive")
        itemsize = torch.empty((), dtype=stype.dtype).element_size()
        info = archive.entries[name]
        if info.file_size != numel * itemsize:
            raise pickle.UnpicklingError(
                f"storage {name} declares {numel} x {itemsize} bytes but the archive holds {info.file_size}"
            )
        view = archive.stored_view(name)
        flat = torch.frombuffer(view, dtype=stype.dtype) if numel else torch.empty(0, dtype=stype.dtype)
        cache[key] = _Storage(flat, key)
        return cache[key]

    return load


def _unpickle(data: bytes, path: str, allowed, what: str, **kw) -> Any:
    try:
        return restricted_loads(data, allowed, **kw)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{path}: refusing to load {what}: {exc}. Only tensors and plain containers are read; "
            f"a pickle that needs code execution is never run (re-save the weights as .safetensors "
            f"from a trusted environment)"
        ) from None
    except XModalError:
        raise
    except (RecursionError, MemoryError) as exc:
        raise UnsafeFileError(f"{path}: refusing to load {what}: the pickle is too deep or too large ({type(exc).__name__})") from None
    except Exception as exc:  # garbage bytes raise many types inside pickle
        raise MalformedFileError(f"{path}: {what} is not a readable pickle ({type(exc).__name__}: {str(exc)[:120]})") from None


def _check_byteorder(archive: _Zip) -> None:
    if archive.has("byteorder"):
        order = archive.read_small("byteorder", 16)
        if order != b"little":
            raise MalformedFileError(f"{archive.path}: written on a {order.decode(errors='replace')!r}-endian machine; only little-endian archives are read")


# ----------------------------------------------------------- torch.save files
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def is_zip(data: Buffer) -> bool:
    return bytes(data[:4]) == b"PK\x03\x04"


def is_torchscript_zip(archive: _Zip) -> bool:
    """TorchScript archives carry `constants.pkl` and `code/`; `torch.save` zips do not."""
    return archive.has("constants.pkl") or any(n.startswith("code/") for n in archive.entries)


def read_torch_file(data: Buffer, path: str) -> Any:
    """The object `torch.save` wrote (zip or legacy format), tensors included; nothing executed."""
    if is_zip(data):
        archive = open_zip(data, path)
        if is_torchscript_zip(archive):
            raise MalformedFileError(f"{path}: this is a TorchScript archive, not a torch.save file")
        if not archive.has("data.pkl"):
            raise MalformedFileError(f"{path}: zip archive without data.pkl (expected a PyTorch checkpoint)")
        _check_byteorder(archive)
        pkl = archive.read_small("data.pkl")
        return _unpickle(pkl, path, tensor_globals(), "this checkpoint",
                         persistent_load=_zip_storage_loader(archive, "data"))
    return _read_legacy(data, path)


def _read_legacy(data: Buffer, path: str) -> Any:
    """The pre-1.6 `torch.save` stream: magic, protocol, sys info, object, storage keys, raw storages."""
    stream = _MemoryFile(data)
    ints_only = builtin_globals(())

    def header(what):
        try:
            return RestrictedUnpickler(stream, ints_only).load()
        except Exception:
            return None

    if header("magic") != LEGACY_MAGIC:
        # a plain pickle (not torch.save): read it under the same rules; tensors in it need
        # torch.storage._load_from_bytes, i.e. torch.load, and are refused by name
        return _unpickle(data, path, tensor_globals(), "this pickle (not a torch.save file)")
    if header("protocol") != LEGACY_PROTOCOL:
        raise MalformedFileError(f"{path}: unsupported legacy torch.save protocol")
    sys_info = header("sys_info")
    if not isinstance(sys_info, dict) or not sys_info.get("little_endian", True):
        raise MalformedFileError(f"{path}: legacy checkpoint from a big-endian machine or without system info")
    pending: Dict[str, Tuple[torch.Tensor, int]] = {}
    remaining = len(data)

    def load(pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unexpected persistent reference {str(pid)[:80]}")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, StorageType) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError("malformed storage reference")
        if view is not None:
            raise pickle.UnpicklingError("storage views of very old checkpoints are not supported")
        if key in pending:
            return _Storage(pending[key][0], key)
        itemsize = torch.empty((), dtype=stype.dtype).element_size()
        if numel * itemsize > remaining:
            raise pickle.UnpicklingError(f"storage {key} declares {numel * itemsize} bytes, more than the file holds")
        flat = torch.empty(numel, dtype=stype.dtype)
        pending[key] = (flat, itemsize)
        return _Storage(flat, key)

    try:
        obj = RestrictedUnpickler(stream, tensor_globals(), persistent_load=load).load()
        keys = RestrictedUnpickler(stream, builtin_globals(("list", "str"))).load()
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{path}: refusing to load this checkpoint: {exc}. Only tensors and plain containers are read; a "
            f"pickle that needs code execution is never run (re-save the weights as .safetensors from a trusted environment)"
        ) from None
    except Exception as exc:
        raise MalformedFileError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(keys, list) or sorted(keys) != sorted(pending):
        raise MalformedFileError(f"{path}: storage list does not match the storages the checkpoint references")
    view = memoryview(data)
    pos = stream.tell()
    for key in keys:
        flat, itemsize = pending[key]
        if pos + 8 > len(view):
            raise MalformedFileError(f"{path}: truncated (storage {key} missing)")
        count = int.from_bytes(view[pos:pos + 8], "little")
        nbytes = flat.numel() * itemsize
        if count != flat.numel() or pos + 8 + nbytes > len(view):
            raise MalformedFileError(f"{path}: storage {key} is truncated or has the wrong size")
        if nbytes:
            flat.copy_(torch.frombuffer(bytearray(view[pos + 8:pos + 8 + nbytes]), dtype=flat.dtype))
        pos += 8 + nbytes
    return obj


# ------------------------------------------------------------------ TorchScript
@dataclass
class ScriptArchive:
    """The tensors of a TorchScript archive, named as `torch.jit.load(f).state_dict()` names them."""

    state_dict: "collections.OrderedDict[str, torch.Tensor]"
    module_classes: Dict[str, str]  # dotted module path ("" = root) -> class name without mangling


_CLASS_RE = re.compile(r"^class (\w+)\((\w*)\):\s*$")


def _class_declarations(archive: _Zip, qualname: str) -> Tuple[bool, List[str], List[str]]:
    """(is a Module, __parameters__, __buffers__) of one class, read as text from code/."""
    module, _, name = qualname.rpartition(".")
    if not module.startswith("__torch__") or not re.fullmatch(r"[\w.]+", module):
        raise UnsafeFileError(f"{archive.path}: TorchScript class {qualname!r} has an invalid name")
    entry = "code/" + module.replace(".", "/") + ".py"
    if not archive.has(entry):
        raise MalformedFileError(f"{archive.path}: TorchScript class {qualname} has no definition ({entry} missing)")
    source = archive.read_small(entry).decode("utf-8", errors="replace").splitlines()
    inside, is_module, params, buffers = False, False, None, None
    for line in source:
        m = _CLASS_RE.match(line)
        if m:
            if inside:
                break
            inside = m.group(1) == name
            is_module = m.group(2) == "Module"
            continue
        if not inside:
            continue
        stripped = line.strip()
        for attr in ("__parameters__", "__buffers__"):
            if stripped.startswith(attr + " = "):
                try:
                    value = ast.literal_eval(stripped[len(attr) + 3:])
                except (ValueError, SyntaxError, RecursionError, MemoryError):
                    raise MalformedFileError(f"{archive.path}: unreadable {attr} of TorchScript class {qualname}") from None
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise MalformedFileError(f"{archive.path}: {attr} of TorchScript class {qualname} is not a list of names")
                if attr == "__parameters__":
                    params = value
                else:
                    buffers = value
    if not inside and params is None:
        raise MalformedFileError(f"{archive.path}: TorchScript class {qualname} is not defined in {entry}")
    return is_module, params or [], buffers or []


def read_torchscript(data: Buffer, path: str) -> ScriptArchive:
    """Parameters and buffers of a `torch.jit.save` archive, without running any of its code."""
    archive = open_zip(data, path)
    if not archive.has("data.pkl"):
        raise MalformedFileError(f"{path}: TorchScript archive without data.pkl")
    _check_byteorder(archive)
    for name in archive.entries:
        if name.startswith("code/") and name.endswith(".py"):
            text = archive.read_small(name).decode("utf-8", errors="replace")
            m = re.search(r"^\s*def (__setstate__)\(", text, re.MULTILINE) or \
                re.search(r"^\s*def (__getstate__)\(", text, re.MULTILINE)
            if m:
                raise UnsafeFileError(
                    f"{path}: refusing to load: this TorchScript archive defines {m.group(1)} ({archive.prefix}{name}), "
                    f"code that torch.jit.load would run; xmodal never runs code from a weights file. Export the "
                    f"weights as a state dict or .safetensors from a trusted environment"
                )
    root = _unpickle(archive.read_small("data.pkl"), path, tensor_globals(script=True), "this TorchScript archive",
                     persistent_load=_zip_storage_loader(archive, "data"), script_objects=True)
    if not isinstance(root, ScriptObject):
        raise MalformedFileError(f"{path}: TorchScript data.pkl does not hold a module")
    state: "collections.OrderedDict[str, torch.Tensor]" = collections.OrderedDict()
    classes: Dict[str, str] = {}
    decls: Dict[str, Tuple[bool, List[str], List[str]]] = {}
    seen = set()

    def walk(obj: ScriptObject, prefix: str) -> None:
        if prefix.count(".") > 64:
            raise UnsafeFileError(f"{path}: TorchScript modules nested more than 64 deep ({prefix[:80]}...)")
        if id(obj) in seen:
            raise MalformedFileError(f"{path}: TorchScript module {prefix or '<root>'} appears twice in the module tree")
        seen.add(id(obj))
        if obj.qualname not in decls:
            decls[obj.qualname] = _class_declarations(archive, obj.qualname)
        is_module, params, buffers = decls[obj.qualname]
        attrs = obj.state
        if not isinstance(attrs, dict):
            raise UnsafeFileError(f"{path}: TorchScript object {obj.qualname} has a custom state; refusing to interpret it")
        classes[prefix.rstrip(".")] = re.sub(r"^___torch_mangle_\d+\.", "", obj.qualname.rsplit(".", 1)[-1])
        for group in (params, buffers):
            for name in group:
                if name not in attrs:
                    raise MalformedFileError(f"{path}: {obj.qualname} declares {name} but the archive has no value for it")
                value = attrs[name]
                if value is None:
                    continue  # an optional parameter that is unset (bias=None)
                if not torch.is_tensor(value):
                    raise MalformedFileError(f"{path}: {prefix}{name} should be a tensor, got {type(value).__name__}")
                state[prefix + name] = value
        for name, value in attrs.items():
            if isinstance(value, ScriptObject):
                if value.qualname not in decls:
                    decls[value.qualname] = _class_declarations(archive, value.qualname)
                if not decls[value.qualname][0]:
                    continue  # a scripted class that is not a Module holds no parameters
                if not isinstance(name, str) or not re.fullmatch(r"\w+", name):
                    raise MalformedFileError(f"{path}: submodule name {str(name)[:40]!r} is not a plain name")
                walk(value, f"{prefix}{name}.")

    walk(root, "")
    return ScriptArchive(state, classes)


__all__ = [
    "UnsafeFileError",
    "MalformedFileError",
    "RestrictedUnpickler",
    "ScriptObject",
    "ScriptArchive",
    "restricted_loads",
    "builtin_globals",
    "tensor_globals",
    "open_zip",
    "is_zip",
    "is_torchscript_zip",
    "read_torch_file",
    "read_torchscript",
    "PLAIN_BUILTINS",
]
