"""What every annotation reader produces: `Item`s and the `DatasetSpec` that holds them.

Readers differ in file formats; downstream code (datasets, evaluation, `data inspect`)
only ever sees these two types, so one benchmark's quirks never leak past its reader.
`require_media` is the one place that decides what a split with absent media files means:
an error by default, the present subset (recorded as partial) when the user allows it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from xmodal.errors import DataError, MissingMediaError

KINDS = ("video", "image")
#: kinds of a description, in the order of their `desc_kind` code (0, 1, 2); padding is -1
DESCRIPTION_KINDS = ("spatial", "temporal", "generic")
DESC_KIND_CODE = {kind: code for code, kind in enumerate(DESCRIPTION_KINDS)}
DESC_KIND_PAD = -1
#: how many paths a missing/unreadable-media message shows
SHOWN_PATHS = 3


@dataclass
class Item:
    """One visual item of a split with all of its captions.

    `media` is an absolute path; `start`/`end` (seconds) restrict a video to a segment
    (None: from the beginning / to the end). `descriptions` are richer texts about the
    item (own JSONL or a descriptions sidecar), tokenised into `desc_tokens` for methods
    that use them; `description_kinds[i]` says what `descriptions[i]` describes
    ("spatial", "temporal" or "generic" for an unkinded list; filled with "generic" when
    only `descriptions` is given).
    """

    id: str
    media: str
    kind: str
    captions: List[str]
    descriptions: List[str] = field(default_factory=list)
    start: Optional[float] = None
    end: Optional[float] = None
    description_kinds: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.descriptions and not self.description_kinds:
            self.description_kinds = ["generic"] * len(self.descriptions)
        if len(self.description_kinds) != len(self.descriptions):
            raise DataError(f"item {self.id!r}: {len(self.descriptions)} descriptions but "
                            f"{len(self.description_kinds)} description_kinds; expected one kind per description")
        unknown = sorted(set(self.description_kinds) - set(DESCRIPTION_KINDS))
        if unknown:
            raise DataError(f"item {self.id!r}: description kind(s) {unknown}; expected {', '.join(DESCRIPTION_KINDS)}")

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class DatasetSpec:
    """A split of a benchmark, read from its annotation files, with its protocol defaults.

    `max_frames` is the protocol's frame budget (12 for clip-level benchmarks, 64 for the
    paragraph ones); `multi_caption_eval` says whether test items carry several captions
    that are all queries (MSVD, COCO, Flickr30K) rather than one (MSR-VTT 1k-A).
    `missing_media` counts items whose media file does not exist (not fatal when reading;
    `require_media` / `EvalDataset` decide); `dropped` holds the items that
    `read_dataset(drop_missing=True)` removed (`dropped_media`: their paths), so a test set
    built from the spec still knows it is partial. `descriptions` is the sidecar file the
    items' descriptions came from, `descriptions_per_kind` how many of each kind a sample
    shows (None: all).
    """

    name: str
    split: str
    items: List[Item]
    root: str
    max_frames: int = 12
    multi_caption_eval: bool = False
    paragraph: bool = False
    sources: List[str] = field(default_factory=list)
    missing_media: int = 0
    notes: str = ""
    descriptions: Optional[str] = None
    descriptions_per_kind: Optional[int] = None
    dropped: List[Item] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def num_captions(self) -> int:
        return sum(len(item.captions) for item in self.items)

    @property
    def kind(self) -> str:
        """'video', 'image', 'mixed' (own data may mix both) or 'empty'."""
        kinds = {item.kind for item in self.items}
        if not kinds:
            return "empty"
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def dropped_media(self) -> List[str]:
        return [item.media for item in self.dropped]

    @property
    def where(self) -> str:
        """'msrvtt test (root /data/msrvtt)': how errors about this split name it."""
        return f"{self.name} {self.split} (root {self.root})"


def shown(paths: Sequence[str]) -> str:
    """The first few paths of a list, for one-line messages."""
    head = ", ".join(str(p) for p in paths[:SHOWN_PATHS])
    return head + (", ..." if len(paths) > SHOWN_PATHS else "")


def missing_paths(items: Sequence[Item]) -> List[str]:
    """Media paths of `items` that are not existing files (in item order)."""
    return [item.media for item in items if not os.path.isfile(item.media)]


def require_media(items: Sequence[Item], where: str, allow_missing: bool = False) -> Tuple[List[Item], List[str]]:
    """(items whose media file exists, paths of the missing ones).

    A split with no items, or whose items all lack their media, is a DataError naming
    `where` (the dataset, split and root). Any missing file is a `MissingMediaError` with
    the count and the first paths unless `allow_missing`, which returns the present subset:
    the caller must record it as partial. Missing items never reach a gallery or a metric.
    """
    items = list(items)
    if not items:
        raise DataError(f"{where}: the split has no items (check the split name and the annotation files)")
    missing = missing_paths(items)
    if len(missing) == len(items):
        raise DataError(f"{where}: none of the {len(items)} media files exists (first expected: {shown(missing)}); "
                        f"check the dataset root / media folder")
    if missing and not allow_missing:
        raise MissingMediaError(f"{where}: {len(missing)} of {len(items)} media files are missing "
                                f"(first: {shown(missing)}); --allow-missing proceeds on the readable subset "
                                f"and marks the result partial")
    absent = set(missing)
    return [item for item in items if item.media not in absent], missing
