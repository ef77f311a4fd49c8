"""Descriptions for MSTA-style methods: richer texts about an item, by kind.

Every benchmark reader takes a sidecar JSON file (`read_dataset(..., descriptions=PATH)`,
or `data.options: {descriptions: PATH}` in a run config) of the form

    {"video9770": {"spatial": ["a desk with a computer", ...], "temporal": ["first ..., then ..."]},
     "video9771": ["an unkinded description", ...]}

keyed by item id (`xmodal data inspect` shows the ids). A kind maps to a list of strings
(or one string); a plain list means kind "generic", as does own JSONL's
`"descriptions": [...]` (own JSONL also takes the dict form). Ids of the sidecar that match
no item of the split are counted and logged as one warning (a sidecar usually covers all
splits); items without an entry simply have no descriptions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

from xmodal.data.items import DESCRIPTION_KINDS, DatasetSpec
from xmodal.data.readers._common import as_text, check_keys, fail, load_json
from xmodal.errors import DataError

log = logging.getLogger(__name__)

Described = Tuple[List[str], List[str]]  # (texts, kinds), parallel


def parse_descriptions(value: Any, path, where: str) -> Described:
    """A list/str (generic) or {kind: list/str} -> (texts, kinds); errors name file and key."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        texts = [as_text(v, path, f"{where}[{i}]") for i, v in enumerate(value)]
        return texts, ["generic"] * len(texts)
    if not isinstance(value, dict):
        raise fail(path, where, 'a list of strings or an object {"spatial": [...], "temporal": [...]}', value)
    check_keys(value, DESCRIPTION_KINDS, path, where)
    texts: List[str] = []
    kinds: List[str] = []
    for kind in DESCRIPTION_KINDS:  # a fixed kind order, whatever the file's
        entry = value.get(kind)
        if entry is None:
            continue
        entry = [entry] if isinstance(entry, str) else entry
        if not isinstance(entry, list):
            raise fail(path, f"{where}.{kind}", "a list of strings", entry)
        for i, text in enumerate(entry):
            texts.append(as_text(text, path, f"{where}.{kind}[{i}]"))
            kinds.append(kind)
    return texts, kinds


def load_sidecar(path) -> Dict[str, Described]:
    """item id -> (texts, kinds) from a sidecar file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"descriptions sidecar {path} does not exist")
    data = load_json(path)
    if not isinstance(data, dict):
        raise fail(path, "top level", 'an object of item id -> {"spatial": [...], "temporal": [...]}',
                   type(data).__name__)
    return {str(key): parse_descriptions(value, path, f"key {key!r}") for key, value in data.items()}


def attach(spec: DatasetSpec, path) -> DatasetSpec:
    """Give the items of `spec` their sidecar descriptions (in place; returns `spec`)."""
    sidecar = load_sidecar(path)
    ids = {item.id for item in spec.items}
    for item in spec.items:
        entry = sidecar.get(item.id)
        if entry is None:
            continue
        if item.descriptions:
            raise DataError(f"{path}: key {item.id!r}: item already has descriptions from "
                            f"{', '.join(spec.sources)}; give them in one place")
        item.descriptions, item.description_kinds = list(entry[0]), list(entry[1])
    unmatched = [key for key in sidecar if key not in ids]
    if unmatched:
        log.warning("%s: %d of %d ids match no item of %s %s (e.g. %s)", path, len(unmatched), len(sidecar),
                    spec.name, spec.split, ", ".join(repr(k) for k in unmatched[:3]))
    described = sum(1 for item in spec.items if item.descriptions)
    spec.descriptions = str(Path(path).resolve())
    note = f"descriptions for {described} of {len(spec.items)} items from {Path(path).name}"
    if unmatched:
        note += f" ({len(unmatched)} sidecar ids match no item)"
    spec.notes = f"{spec.notes}; {note}" if spec.notes else note
    return spec
