"""Helpers shared by the annotation readers: locating files, parsing with errors that name
the file and place, finding media files, and assembling the `DatasetSpec`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

from xmodal.data.items import DatasetSpec, Item
from xmodal.errors import DataError

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".3gp", ".3g2", ".mts", ".flv")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def fail(path, where: str, expected: str, got: Any = None) -> DataError:
    """A DataError that says which file, where in it, what was expected and what was found."""
    msg = f"{path}: {where}: expected {expected}"
    if got is not None:
        shown = repr(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg += f", got {shown}"
    return DataError(msg)


def annotation_dirs(root, annotations=None) -> List[Path]:
    """Where to look for annotation files: `annotations` if given, else root and root/annotations."""
    if annotations is not None:
        return [Path(annotations)]
    return [Path(root), Path(root) / "annotations"]


def find_annotation(dataset: str, split: str, names: Sequence[str], dirs: Sequence[Path],
                    annotation_file=None, required: bool = True) -> Optional[Path]:
    """The first of `names` found in `dirs` (or `annotation_file` itself)."""
    if annotation_file is not None:
        path = Path(annotation_file)
        if not path.is_file():
            raise DataError(f"{dataset} {split}: annotation file {path} does not exist")
        return path
    for d in dirs:
        for name in names:
            path = Path(d) / name
            if path.is_file():
                return path
    if not required:
        return None
    tried = ", ".join(names)
    where = " or ".join(str(d) for d in dirs)
    raise DataError(f"{dataset} {split}: none of [{tried}] found in {where} (use --annotations DIR)")


def load_json(path: Path) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_lines(path: Path) -> List[str]:
    """Non-empty stripped lines (tolerates a missing final newline and CRLF)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_id_list(path: Path) -> List[str]:
    """A split list: one id per line, duplicates are an error."""
    ids = read_lines(path)
    seen = set()
    for n, vid in enumerate(ids, 1):
        if vid in seen:
            raise fail(path, f"line {n}", "each id once", vid)
        seen.add(vid)
    return ids


def as_text(value: Any, path, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise fail(path, where, "a non-empty string", value)
    return value.strip()


def as_text_list(value: Any, path, where: str) -> List[str]:
    if not isinstance(value, list) or not value:
        raise fail(path, where, "a non-empty list of strings", value)
    return [as_text(v, path, f"{where}[{i}]") for i, v in enumerate(value)]


def split_stem(name: str) -> str:
    """File name without its extension ('a.b.mp4' -> 'a.b', 'x.' -> 'x', 'x' -> 'x')."""
    base, dot, _ = name.rpartition(".")
    return base if dot and base else name


class MediaFinder:
    """Finds media files by name or by stem in a few directories, listing each directory once.

    Benchmarks are often re-encoded (.avi -> .mp4) or stored with or without a prefix, so a
    file is accepted under its exact name, else under its stem with any extension (the
    preferred extensions first). Lookups never touch the disk after the first listing.
    """

    def __init__(self, dirs: Sequence[Path], exts: Sequence[str] = VIDEO_EXTS):
        self.dirs = [Path(d) for d in dirs]
        self.exts = tuple(exts)
        self._rank = {ext: i for i, ext in enumerate(self.exts)}
        self._listings: Dict[str, tuple] = {}

    def _listing(self, d: str):
        """(set of file names, stem -> best file name) of directory `d` (empty if absent)."""
        listing = self._listings.get(d)
        if listing is None:
            try:
                with os.scandir(d) as it:
                    entries = sorted(e.name for e in it if not e.is_dir())
            except OSError:
                entries = []
            stems: Dict[str, tuple] = {}
            for name in entries:
                stem = split_stem(name)
                rank = self._rank.get(name[len(stem):].lower(), len(self._rank))
                if stem not in stems or rank < stems[stem][0]:
                    stems[stem] = (rank, name)
            listing = (set(entries), {k: v[1] for k, v in stems.items()})
            self._listings[d] = listing
        return listing

    def find(self, stems: Iterable[str] = (), filenames: Iterable[str] = (), dirs: Optional[Sequence] = None) -> str:
        """Absolute path of the first match; if none, the expected path in the first directory.

        `dirs` (default: the finder's) is searched in order; absolute str paths are used as is.
        """
        stems, filenames = list(stems), list(filenames)
        dirs = [d if isinstance(d, str) and os.path.isabs(d) else os.path.abspath(d)
                for d in (dirs if dirs is not None else self.dirs)]
        for d in dirs:
            names, _ = self._listing(d)
            for name in filenames:
                if name in names:
                    return os.path.join(d, name)
        for d in dirs:
            _, by_stem = self._listing(d)
            for stem in stems or [split_stem(n) for n in filenames]:
                if stem in by_stem:
                    return os.path.join(d, by_stem[stem])
        default = filenames[0] if filenames else stems[0] + self.exts[0]
        return os.path.join(dirs[0], default)


def media_dirs(root, media_dir=None, subdirs: Sequence[str] = ("videos",)) -> List[Path]:
    """`media_dir` if given, else root/<subdir> for each conventional subdir, then root."""
    if media_dir is not None:
        return [Path(media_dir)]
    root = Path(root)
    return [root / s for s in subdirs] + [root]


def check_split(dataset: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise DataError(f"{dataset}: unknown split {split!r}; expected one of {', '.join(splits)}")


def finish(name: str, split: str, items: List[Item], root, sources: Sequence[Path], **fields) -> DatasetSpec:
    """Check ids are unique, count missing media and build the DatasetSpec."""
    seen = set()
    for item in items:
        if item.id in seen:
            raise DataError(f"{name} {split}: item id {item.id!r} occurs twice in {', '.join(map(str, sources))}")
        seen.add(item.id)
    missing = sum(1 for item in items if not os.path.exists(item.media))
    return DatasetSpec(
        name=name,
        split=split,
        items=items,
        root=os.path.abspath(root),
        sources=[os.path.abspath(s) for s in sources],
        missing_media=missing,
        **fields,
    )
