"""What every annotation reader produces: `Item`s and the `DatasetSpec` that holds them.

Readers differ in file formats; downstream code (datasets, evaluation, `data inspect`)
only ever sees these two types, so one benchmark's quirks never leak past its reader.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

KINDS = ("video", "image")


@dataclass
class Item:
    """One visual item of a split with all of its captions.

    `media` is an absolute path; `start`/`end` (seconds) restrict a video to a segment
    (None: from the beginning / to the end). `descriptions` are richer texts about the
    item (own data only), tokenised into `desc_tokens` for methods that use them.
    """

    id: str
    media: str
    kind: str
    captions: List[str]
    descriptions: List[str] = field(default_factory=list)
    start: Optional[float] = None
    end: Optional[float] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class DatasetSpec:
    """A split of a benchmark, read from its annotation files, with its protocol defaults.

    `max_frames` is the protocol's frame budget (12 for clip-level benchmarks, 64 for the
    paragraph ones); `multi_caption_eval` says whether test items carry several captions
    that are all queries (MSVD, COCO, Flickr30K) rather than one (MSR-VTT 1k-A).
    `missing_media` counts items whose media file does not exist (not fatal when reading).
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
