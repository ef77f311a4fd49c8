"""MSR-VTT (Xu et al., 2016) in the CLIP4Clip layout.

- `MSRVTT_data.json`: `{"videos": [{"video_id", "split", ...}], "sentences": [{"video_id",
  "caption", "sen_id"}]}` -- 20 captions per video.
- `MSRVTT_train.9k.csv` / `MSRVTT_train.7k.csv`: one column `video_id` (training videos).
- `MSRVTT_JSFUSION_test.csv`: the 1k-A test split, `key,vid_key,video_id,sentence`, one
  caption per video (also accepted: its JSON-list form `test_1kA_fdvs.json`).

CSV files may start with a UTF-8 BOM; a row running over several lines (an unbalanced
quote), a row with more fields than the header (an unquoted comma) and a repeated video id
are errors naming the file and the line(s).

Training items keep all captions of a video; `TrainDataset` draws one per epoch, as
CLIP4Clip does. Splits: `train` (= `train_9k`), `train_7k`, `test` (1k-A), `val` and
`test_full` (the official validate/test videos of MSRVTT_data.json, all captions).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Dict, List, Tuple

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


def read_csv_rows(path: Path, required: List[str]) -> List[Tuple[int, Dict[str, str]]]:
    """(line number, row) of a comma-separated file with a header (a UTF-8 BOM is accepted).

    `required` columns must be present and non-empty. A row that spans several lines (an
    unbalanced quote swallowing the rows after it) or has more fields than the header
    (an unquoted comma cutting a caption) is an error naming the file and the line.
    """
    rows = []
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise fail(path, "line 1 (header)", f"columns {required}", header)
            last = reader.line_num
            for row in reader:
                breaks = sum(v.count("\n") for v in row.values() if isinstance(v, str))
                # the row's first line (blank lines are skipped; a quote left open at the end
                # of the file also swallows the final newline)
                n = max(last + 1, reader.line_num - breaks)
                last = reader.line_num
                if breaks:
                    raise DataError(f"{path}: line {n}: a quoted field runs over lines {n}-{reader.line_num} "
                                    f"(unbalanced quote?); expected one row per line")
                if None in row:
                    raise fail(path, f"line {n}", f"{len(header)} comma-separated fields (quote a caption that "
                               f"contains a comma)", f"{len(header) + len(row[None])} fields")
                for col in required:
                    value = row.get(col)
                    if value is None or not value.strip():
                        raise fail(path, f"line {n} column {col!r}", "a non-empty value", value)
                rows.append((n, {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from None
    return rows


def read_video_ids(path: Path) -> List[str]:
    """The `video_id` column of a train-split CSV; a repeated id is an error naming both lines."""
    first: Dict[str, int] = {}
    for n, row in read_csv_rows(path, ["video_id"]):
        vid = row["video_id"]
        if vid in first:
            raise fail(path, f"line {n}", f"each video_id once (also on line {first[vid]})", vid)
        first[vid] = n
    return list(first)


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
    seen: Dict[str, int] = {}
    for i, video in enumerate(videos):
        if not isinstance(video, dict):
            raise fail(path, f"videos[{i}]", "an object with video_id and split", video)
        if video.get("split") == official:
            vid = as_text(video.get("video_id"), path, f"videos[{i}].video_id")
            if vid in seen:
                raise fail(path, f"videos[{i}].video_id", f"each video once (also videos[{seen[vid]}])", vid)
            seen[vid] = i
            ids.append(vid)
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
    first: Dict[str, int] = {}
    for n, row in read_csv_rows(path, ["video_id", "sentence"]):
        vid = row["video_id"]
        if vid in caption:
            raise fail(path, f"line {n}", f"each video_id once (also on line {first[vid]}; 1k-A has one caption "
                       "per video)", vid)
        caption[vid], first[vid] = row["sentence"], n
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
            ids = read_video_ids(ids_path)
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
