"""MSR-VTT (Xu et al., 2016) in the CLIP4Clip layout.

- `MSRVTT_data.json`: `{"videos": [{"video_id", "split", ...}], "sentences": [{"video_id",
  "caption", "sen_id"}]}` -- 20 captions per video.
- `MSRVTT_train.9k.csv` / `MSRVTT_train.7k.csv`: one column `video_id` (training videos).
- `MSRVTT_JSFUSION_test.csv`: the 1k-A test split, `key,vid_key,video_id,sentence`, one
  caption per video (also accepted: its JSON-list form `test_1kA_fdvs.json`).

Training items keep all captions of a video; `TrainDataset` draws one per epoch, as
CLIP4Clip does. Splits: `train` (= `train_9k`), `train_7k`, `test` (1k-A), `val` and
`test_full` (the official validate/test videos of MSRVTT_data.json, all captions).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List

from xmodal.data.items import DatasetSpec, Item
from xmodal.data.readers._common import (
    MediaFinder,
    annotation_dirs,
    as_text,
    check_split,
    fail,
    find_annotation,
    finish,
    load_json,
    media_dirs,
)
from xmodal.errors import DataError

NAME = "msrvtt"
SPLITS = ("train", "train_9k", "train_7k", "test", "val", "test_full")
DATA_JSON = "MSRVTT_data.json"
TRAIN_CSV = {"train": "MSRVTT_train.9k.csv", "train_9k": "MSRVTT_train.9k.csv", "train_7k": "MSRVTT_train.7k.csv"}
TEST_CSV = "MSRVTT_JSFUSION_test.csv"
TEST_JSON = "test_1kA_fdvs.json"
OFFICIAL_SPLIT = {"val": "validate", "test_full": "test"}


def read_csv_rows(path: Path, required: List[str]) -> List[Dict[str, str]]:
    """Rows of a comma-separated file with a header; `required` columns must be present and non-empty."""
    rows = []
    with open(path, "r", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in required if c not in header]
        if missing:
            raise fail(path, "line 1 (header)", f"columns {required}", header)
        for row in reader:
            for col in required:
                value = row.get(col)
                if value is None or not value.strip():
                    raise fail(path, f"line {reader.line_num} column {col!r}", "a non-empty value", value)
            rows.append({k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()})
    return rows


def _sentences_by_video(path: Path, data) -> Dict[str, List[str]]:
    if not isinstance(data, dict) or not isinstance(data.get("sentences"), list):
        raise fail(path, "top level", 'an object with a "sentences" list', type(data).__name__)
    captions: Dict[str, List[str]] = {}
    for i, sent in enumerate(data["sentences"]):
        where = f"sentences[{i}]"
        if not isinstance(sent, dict):
            raise fail(path, where, "an object with video_id and caption", sent)
        vid = as_text(sent.get("video_id"), path, f"{where}.video_id")
        captions.setdefault(vid, []).append(as_text(sent.get("caption"), path, f"{where}.caption"))
    return captions


def _official_ids(path: Path, data, official: str) -> List[str]:
    videos = data.get("videos")
    if not isinstance(videos, list):
        raise fail(path, "top level", 'a "videos" list', type(videos).__name__)
    ids = []
    for i, video in enumerate(videos):
        if not isinstance(video, dict):
            raise fail(path, f"videos[{i}]", "an object with video_id and split", video)
        if video.get("split") == official:
            ids.append(as_text(video.get("video_id"), path, f"videos[{i}].video_id"))
    return ids


def _read_test_1ka(path: Path) -> Dict[str, str]:
    caption: Dict[str, str] = {}
    if path.suffix == ".json":
        data = load_json(path)
        if not isinstance(data, list):
            raise fail(path, "top level", "a list of {clip_name, caption}", type(data).__name__)
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise fail(path, f"[{i}]", "an object with clip_name and caption", row)
            vid = as_text(row.get("clip_name"), path, f"[{i}].clip_name")
            if vid in caption:
                raise fail(path, f"[{i}].clip_name", "each video once", vid)
            caption[vid] = as_text(row.get("caption"), path, f"[{i}].caption")
        return caption
    for n, row in enumerate(read_csv_rows(path, ["video_id", "sentence"]), 2):
        if row["video_id"] in caption:
            raise fail(path, f"line {n}", "each video_id once (1k-A has one caption per video)", row["video_id"])
        caption[row["video_id"]] = row["sentence"]
    return caption


def read(root, split: str = "test", *, annotations=None, annotation_file=None, media_dir=None) -> DatasetSpec:
    """Items of an MSR-VTT split; videos are `{video_id}.mp4` under videos/, videos/all/ or root."""
    check_split(NAME, split, SPLITS)
    dirs = annotation_dirs(root, annotations)
    finder = MediaFinder(media_dirs(root, media_dir, ("videos", "videos/all")))
    sources: List[Path] = []
    items: List[Item] = []
    multi = False
    if split == "test":
        path = find_annotation(NAME, split, [TEST_CSV, TEST_JSON], dirs, annotation_file)
        sources.append(path)
        for vid, caption in _read_test_1ka(path).items():
            items.append(Item(id=vid, media=finder.find([vid]), kind="video", captions=[caption]))
    else:
        data_path = find_annotation(NAME, split, [DATA_JSON], dirs, annotation_file)
        data = load_json(data_path)
        captions = _sentences_by_video(data_path, data)
        if split in TRAIN_CSV:
            ids_path = find_annotation(NAME, split, [TRAIN_CSV[split]], dirs)
            ids = [row["video_id"] for row in read_csv_rows(ids_path, ["video_id"])]
            sources += [ids_path, data_path]
        else:
            ids = _official_ids(data_path, data, OFFICIAL_SPLIT[split])
            sources.append(data_path)
            multi = True
        for vid in ids:
            if vid not in captions:
                raise DataError(f"{data_path}: sentences: expected captions for video {vid!r} of the {split} split, found none")
            items.append(Item(id=vid, media=finder.find([vid]), kind="video", captions=list(captions[vid])))
    return finish(NAME, split, items, root, sources, max_frames=12, multi_caption_eval=multi)
