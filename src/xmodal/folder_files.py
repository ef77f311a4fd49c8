"""Reading the files of a folder xmodal wrote (adapter, training checkpoint, index) as data only.

Such a folder is handed around between people; its files must not be a way to make xmodal
read something else (a link to a file outside the folder) or to crash it with a traceback
(JSON nested 100,000 deep, a 5 GB "config"). Both checks live here so every folder reader
applies the same rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

from xmodal.errors import XModalError

PathLike = Union[str, os.PathLike]
MAX_JSON_BYTES = 64 << 20   # metadata files are small; a larger one is not ours


class FolderFileError(XModalError):
    """A file of a saved folder points outside it, or is not the data it should be."""


def file_inside(directory: PathLike, name: PathLike) -> Path:
    """`directory/name`, refused when it (or a link on the way) resolves outside `directory`."""
    directory = Path(directory)
    path = directory / name
    real_dir = directory.resolve()
    real = path.resolve()
    if real != real_dir and real_dir not in real.parents:
        raise FolderFileError(f"{path}: resolves to {real}, outside the folder {directory}; "
                              f"a saved folder must hold its own files (copy the file in instead of linking it)")
    return path


def read_json_file(path: PathLike, what: str = "a JSON file") -> Any:
    """Parse a small JSON file with a one-line error for every way it can be broken (`what`: "an adapter config")."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FolderFileError(f"{path}: cannot read it ({exc.strerror}); expected {what}") from None
    if size > MAX_JSON_BYTES:
        raise FolderFileError(f"{path}: {size} bytes, far larger than {what} can be (at most {MAX_JSON_BYTES})")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise FolderFileError(f"{path}: not UTF-8 text; expected {what}") from None
    except json.JSONDecodeError as exc:
        raise FolderFileError(f"{path}: invalid JSON ({exc}); expected {what}") from None
    except RecursionError:
        raise FolderFileError(f"{path}: JSON nested too deeply; expected {what}") from None
