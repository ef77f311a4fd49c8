"""Atomic, umask-respecting writes: a reader sees the old file/folder or the new one, never half of one.

Every file xmodal writes (metrics, configs, adapters, checkpoints, indices, caches) goes through
here, so that (a) an interrupted write leaves the previous result intact, (b) files get the
permissions the user's umask asks for (mkstemp/mkdtemp alone make 0600/0700, unreadable to
collaborators), and (c) a full disk or an unwritable folder is one line naming the path, with the
temporary file or folder removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

from xmodal.errors import XModalError

PathLike = Union[str, os.PathLike]


class WriteError(XModalError):
    """A result could not be written (disk full, permission denied, path is a file ...)."""


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def describe_write_error(exc: OSError, path: Path) -> str:
    """One line for an OSError while writing `path` (disk full, permission, a file where a folder belongs ...)."""
    if exc.errno == errno.ENOSPC:
        return f"no space left on device while writing {path}; free space or choose another output folder"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied ({exc.strerror})"
    if exc.errno == errno.ENOTDIR:
        return f"cannot write {path}: a parent of it is a file, not a folder"
    if exc.errno == errno.EISDIR:
        return f"cannot write {path}: it is an existing folder, expected a file path"
    return f"cannot write {path}: {exc.strerror or exc}"


def ensure_dir(path: PathLike) -> Path:
    """mkdir -p with a one-line error (a path that exists as a file, no permission, disk full)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise WriteError(f"cannot use {path} as an output folder: it is an existing file")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(describe_write_error(exc, path)) from None
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    if path.is_dir():
        raise WriteError(f"cannot write {path}: it is an existing folder, expected a file path")
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise WriteError(describe_write_error(exc, path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError(describe_write_error(exc, path)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, obj: Any, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_file(path: PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer that wants a file name (safetensors, faiss, PIL).

    On success the temp file gets umask permissions and replaces `path`; on any failure it is removed
    and `path` is untouched.
    """
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise WriteError(describe_write_error(exc, path)) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, file_mode())
        os.replace(tmp_path, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise WriteError(describe_write_error(exc, path)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def _chmod_tree(root: Path) -> None:
    fmode, dmode = file_mode(), dir_mode()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, dmode)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)


@contextlib.contextmanager
def atomic_directory(directory: PathLike) -> Iterator[Path]:
    """Build a whole folder in a sibling temp folder, then swap it in with renames.

    The previous folder is moved aside (`.NAME.old-*`) and deleted only after the new one is in
    place, so at every instant one complete copy exists under a known name. On failure the temp
    folder is removed and the previous folder is untouched.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise WriteError(f"cannot write {directory}: it is an existing file, expected a folder")
    ensure_dir(directory.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.new-", dir=directory.parent))
    except OSError as exc:
        raise WriteError(describe_write_error(exc, directory)) from None
    try:
        yield tmp
        _chmod_tree(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.rmdir(old)
            os.replace(directory, old)
            try:
                os.replace(tmp, directory)
            except BaseException:
                os.replace(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(describe_write_error(exc, directory)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
