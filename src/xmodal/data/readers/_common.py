"""Helpers shared by the annotation readers: locating files, parsing with errors that name
the file and place, finding media files, and assembling the `DatasetSpec`.

Text files are read as UTF-8 with an optional byte-order mark. JSON objects with a repeated
key are an error (the json module would silently keep the last value), and so are two
items of one split that point at the same media file and segment.
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from xmodal.data.items import DatasetSpec, Item, missing_paths
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


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def read_text(path) -> str:
    """The file as text: UTF-8, a leading byte-order mark dropped."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def parse_json(text: str, path, where: str = "") -> Any:
    """json.loads with errors naming the file (and `where`, e.g. 'line 3') and no repeated keys."""
    prefix = f"{path}: {where}: " if where else f"{path}: "
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as exc:
        raise DataError(f"{prefix}key {exc.args[0]!r} appears twice in one object; expected each key once") from None
    except json.JSONDecodeError as exc:
        if where:
            raise DataError(f"{prefix}invalid JSON ({exc.msg} at column {exc.colno})") from None
        raise DataError(f"{prefix}line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg})") from None


def load_json(path: Path) -> Any:
    return parse_json(read_text(path), path)


def json_lines(path: Path) -> List[Tuple[int, Any]]:
    """(line number, record) of every non-blank line of a JSONL file."""
    return [(n, parse_json(line, path, f"line {n}"))
            for n, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]


def read_lines(path: Path) -> List[str]:
    """Non-empty stripped lines (tolerates a missing final newline, CRLF and a BOM)."""
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def check_keys(record: Dict[str, Any], allowed: Sequence[str], path, where: str) -> None:
    """Unknown keys are an error naming the key, the allowed ones and the closest match.

    A typo in an optional key ("strat") would otherwise be ignored and change what is read.
    """
    for key in record:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"{path}: {where}: unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}")


def is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def as_seconds(value: Any, path, where: str) -> float:
    """A finite number of seconds >= 0 (JSON lets NaN and Infinity through)."""
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise fail(path, where, "a finite number of seconds >= 0", value)
    return float(value)


def check_segment(start: Optional[float], end: Optional[float], path, where: str) -> None:
    """start < end when both are given (values already checked by `as_seconds`)."""
    if start is not None and end is not None and not start < end:
        raise fail(path, f"{where} field 'end'", f"a time after start={start:g}", end)


def read_id_list(path: Path) -> List[str]:
    """A split list: one id per line (blank lines skipped), duplicates are an error naming both lines."""
    ids: Dict[str, int] = {}
    for n, line in enumerate(read_text(path).splitlines(), 1):
        vid = line.strip()
        if not vid:
            continue
        if vid in ids:
            raise fail(path, f"line {n}", f"each id once (also on line {ids[vid]})", vid)
        ids[vid] = n
    return list(ids)


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
    """Check ids and media are unique, count missing media and build the DatasetSpec.

    Two items with the same media file and segment would be one video counted twice in a
    gallery (e.g. `a.mp4` and `./a.mp4`); readers merge what their format legitimately
    repeats before this point, so here it is an error naming both ids.
    """
    seen = set()
    media: Dict[tuple, str] = {}
    for item in items:
        if item.id in seen:
            raise DataError(f"{name} {split}: item id {item.id!r} occurs twice in {', '.join(map(str, sources))}")
        seen.add(item.id)
        key = (os.path.normpath(item.media), item.start, item.end)
        if key in media:
            raise DataError(f"{name} {split}: items {media[key]!r} and {item.id!r} of {', '.join(map(str, sources))} "
                            f"are the same media file {item.media}; expected each video/image once per split")
        media[key] = item.id
    missing = len(missing_paths(items))
    return DatasetSpec(
        name=name,
        split=split,
        items=items,
        root=os.path.abspath(root),
        sources=[os.path.abspath(s) for s in sources],
        missing_media=missing,
        **fields,
    )
