"""Annotation readers and `xmodal data inspect`, on the real shared files and on fixtures
of the published shapes (tests/fixtures)."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
from pathlib import Path

import pytest

from xmodal.cli import main
from xmodal.data import READERS, DatasetSpec, Item, read_dataset
from xmodal.errors import DataError, XModalError

FIX = Path(__file__).resolve().parent / "fixtures"


def inspect_json(capsys, *argv):
    assert main(["data", "inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ------------------------------------------------------------------ CLI on shared data
def test_inspect_counts_on_shared_annotations(shared_data, capsys):
    ann = shared_data / "annotations"
    msrvtt = inspect_json(capsys, "msrvtt", "--root", str(shared_data / "video" / "msrvtt_1kA"),
                          "--annotations", str(ann / "msrvtt"), "--split", "test")
    assert {"items", "captions", "missing_media", "first_item"} <= set(msrvtt)
    assert msrvtt["items"] == 1000 and msrvtt["captions"] == 1000
    # 13 of the 1k-A clips are present in the shared video folder
    assert msrvtt["missing_media"] == 1000 - 13
    assert msrvtt["first_item"]["id"] == "video9770"
    assert msrvtt["first_item"]["captions"] == ["a person is connecting something to system"]
    assert msrvtt["first_item"]["media"] == str(shared_data / "video" / "msrvtt_1kA" / "video9770.mp4")

    msvd = inspect_json(capsys, "msvd", "--root", str(ann / "msvd"), "--split", "test")
    assert msvd["items"] == 670 and msvd["missing_media"] == 670
    gt = json.loads((ann / "msvd" / "test_gt.json").read_text())
    assert msvd["captions"] == sum(len(v) for v in gt.values())
    assert msvd["multi_caption_eval"] is True

    anet = inspect_json(capsys, "activitynet", "--root", str(ann / "activitynet"), "--split", "val_1")
    assert anet["items"] == 4917 and anet["captions"] == 4917 and anet["missing_media"] == 4917
    assert anet["max_frames"] == 64 and anet["paragraph"] is True


def test_inspect_text_output_and_errors(shared_data, capsys):
    ann = shared_data / "annotations"
    assert main(["data", "inspect", "activitynet", "--root", str(ann / "activitynet"), "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert "activitynet test: 4917 items, 4917 captions" in out and "4917 missing media" in out
    assert "first item:" in out and "v_uqiMw7tQ1Cc" in out and "(missing)" in out

    assert main(["data", "inspect", "msrvtt", "--root", str(ann / "msrvtt"), "--split", "nope"]) == 2
    assert "unknown split 'nope'" in capsys.readouterr().err
    assert main(["data", "inspect", "lsmdc", "--root", str(ann / "msrvtt")]) == 2
    err = capsys.readouterr().err
    assert "LSMDC16_challenge_1000_publictect.csv" in err and "--annotations" in err
    assert main(["data", "inspect", "coco", "--root", str(ann / "coco"), "-o", "colour=red"]) == 2
    assert "unknown option(s) colour" in capsys.readouterr().err


# ------------------------------------------------------------------------- MSR-VTT
def _build_msrvtt_data_json(shared: Path, out: Path) -> dict:
    """MSRVTT_data.json of the published shape from the shared CSV captions: all 10k video
    ids; the 1k-A videos get their JSFusion caption, the others two captions taken
    round-robin from the same file."""
    rows = list(csv.DictReader(open(shared / "annotations" / "msrvtt" / "MSRVTT_JSFUSION_test.csv")))
    by_vid = {r["video_id"]: r["sentence"] for r in rows}
    pool = [r["sentence"] for r in rows]
    videos, sentences = [], []
    for i in range(10000):
        vid = f"video{i}"
        videos.append({"video_id": vid, "id": i, "category": i % 20, "split": "train" if i < 6513 else "test"})
        caps = [by_vid[vid]] if vid in by_vid else [pool[i % len(pool)], pool[(i * 7 + 1) % len(pool)]]
        sentences += [{"caption": c, "video_id": vid, "sen_id": len(sentences) + k} for k, c in enumerate(caps)]
    data = {"info": {}, "videos": videos, "sentences": sentences}
    out.mkdir(parents=True, exist_ok=True)
    (out / "MSRVTT_data.json").write_text(json.dumps(data))
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv", "MSRVTT_JSFUSION_test.csv", "test_1kA_fdvs.json"):
        shutil.copy(shared / "annotations" / "msrvtt" / name, out / name)
    return data


def test_msrvtt_train_splits_from_shared_csvs(shared_data, tmp_path):
    ann = tmp_path / "ann"
    data = _build_msrvtt_data_json(shared_data, ann)
    train = read_dataset("msrvtt", tmp_path, "train", annotations=ann)
    assert len(train) == 9000 and train.items[0].id == "video0"
    assert train.items[0].captions == [s["caption"] for s in data["sentences"] if s["video_id"] == "video0"]
    assert len(read_dataset("msrvtt", tmp_path, "train_7k", annotations=ann)) == 7010
    assert read_dataset("msrvtt", tmp_path, "train_9k", annotations=ann).items[-1].id == train.items[-1].id
    # the 1k-A test split reads the same from its CSV and from its JSON-list form
    test_csv = read_dataset("msrvtt", tmp_path, "test", annotations=ann)
    test_json = read_dataset("msrvtt", tmp_path, "test", annotation_file=ann / "test_1kA_fdvs.json")
    assert [(i.id, i.captions) for i in test_csv.items] == [(i.id, i.captions) for i in test_json.items]
    assert len(read_dataset("msrvtt", tmp_path, "test_full", annotations=ann)) == 10000 - 6513


def test_msrvtt_fixture_protocol_and_media_layouts(tmp_path):
    spec = read_dataset("msrvtt", tmp_path, "train", annotations=FIX / "msrvtt")
    assert [i.id for i in spec.items] == ["video0", "video1", "video2"]
    assert len(spec.items[0].captions) == 4 and spec.multi_caption_eval is False
    assert [i.id for i in read_dataset("msrvtt", tmp_path, "train_7k", annotations=FIX / "msrvtt").items] == ["video0", "video1"]
    val = read_dataset("msrvtt", tmp_path, "val", annotations=FIX / "msrvtt")
    assert [i.id for i in val.items] == ["video6513"] and val.multi_caption_eval
    test = read_dataset("msrvtt", tmp_path, "test", annotations=FIX / "msrvtt")
    assert test.items[0].captions == ["a person is connecting a cable, then typing"]  # quoted comma kept
    # media: videos/{id}.mp4, videos/all/, root, or a configured folder; re-encodes accepted
    (tmp_path / "videos" / "all").mkdir(parents=True)
    (tmp_path / "videos" / "all" / "video9770.mp4").write_bytes(b"x")
    (tmp_path / "video9771.webm").write_bytes(b"x")
    test = read_dataset("msrvtt", tmp_path, "test", annotations=FIX / "msrvtt")
    assert test.missing_media == 0
    assert test.items[0].media == str(tmp_path / "videos" / "all" / "video9770.mp4")
    assert test.items[1].media == str(tmp_path / "video9771.webm")
    other = tmp_path / "elsewhere"
    other.mkdir()
    spec = read_dataset("msrvtt", tmp_path, "test", annotations=FIX / "msrvtt", video_dir=other)
    assert spec.missing_media == 2 and spec.items[0].media == str(other / "video9770.mp4")
    assert len(read_dataset("msrvtt", tmp_path, "test", annotations=FIX / "msrvtt", drop_missing=True, media_dir=other)) == 0


def test_msrvtt_malformed(tmp_path):
    ann = tmp_path / "ann"
    shutil.copytree(FIX / "msrvtt", ann)
    data = json.loads((ann / "MSRVTT_data.json").read_text())
    data["sentences"] = [s for s in data["sentences"] if s["video_id"] != "video1"]
    (ann / "MSRVTT_data.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"MSRVTT_data.json.*video1"):
        read_dataset("msrvtt", tmp_path, "train", annotations=ann)
    data["sentences"][2]["caption"] = 17
    (ann / "MSRVTT_data.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"sentences\[2\]\.caption: expected a non-empty string, got 17"):
        read_dataset("msrvtt", tmp_path, "train", annotations=ann)
    (ann / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\nret0,msr1,video1,\n")
    with pytest.raises(DataError, match=r"MSRVTT_JSFUSION_test.csv: line 2 column 'sentence'"):
        read_dataset("msrvtt", tmp_path, "test", annotations=ann)
    (ann / "MSRVTT_JSFUSION_test.csv").write_text("key,video,sentence\nret0,video1,hi\n")
    with pytest.raises(DataError, match=r"line 1 \(header\): expected columns \['video_id', 'sentence'\]"):
        read_dataset("msrvtt", tmp_path, "test", annotations=ann)
    (ann / "MSRVTT_data.json").write_text('{"sentences": [\n  {"video_id": "video0",}\n]}')
    with pytest.raises(DataError, match=r"MSRVTT_data.json: line 2 column \d+: invalid JSON"):
        read_dataset("msrvtt", tmp_path, "train", annotations=ann)


# ---------------------------------------------------------------------------- MSVD
def test_msvd_raw_captions_pkl_built_from_test_gt(shared_data, tmp_path):
    src = shared_data / "annotations" / "msvd"
    gt = json.loads((src / "test_gt.json").read_text())
    raw = {vid: [c.split() for c in caps] for vid, caps in gt.items()}
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps(raw, protocol=4))
    shutil.copy(src / "test_list.txt", tmp_path / "test_list.txt")
    from_pkl = read_dataset("msvd", tmp_path, "test")
    from_json = read_dataset("msvd", src, "test")
    assert len(from_pkl) == len(from_json) == 670
    assert from_pkl.sources[0].endswith("raw-captions.pkl") and from_json.sources[0].endswith("test_gt.json")
    assert [i.id for i in from_pkl.items] == [i.id for i in from_json.items]
    assert all(a.captions == [" ".join(c.split()) for c in b.captions] for a, b in zip(from_pkl.items, from_json.items))
    # the train list names videos that only a full raw-captions.pkl covers
    shutil.copy(src / "train_list.txt", tmp_path / "train_list.txt")
    with pytest.raises(DataError, match=r"raw-captions.pkl: expected captions for video '-4wsuPCjDBc_5_15'"):
        read_dataset("msvd", tmp_path, "train")


def test_msvd_fixture_splits_and_media(tmp_path):
    root = tmp_path / "msvd"
    shutil.copytree(FIX / "msvd", root)
    (root / "YouTubeClips").mkdir()
    (root / "YouTubeClips" / "aaaaAAAA111_5_15.avi").write_bytes(b"x")
    test = read_dataset("msvd", root, "test")
    assert [len(i.captions) for i in test.items] == [4, 3, 2] and test.multi_caption_eval
    assert test.items[0].captions[0] == "a dog runs on the beach"
    assert test.items[0].media == str(root / "YouTubeClips" / "aaaaAAAA111_5_15.avi")
    assert test.missing_media == 2 and test.items[1].media.endswith("bbbbBBBB222_0_9.avi")
    assert len(read_dataset("msvd", root, "train")) == 2 and len(read_dataset("msvd", root, "val")) == 1


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > boom.txt",))


def test_msvd_pickle_is_restricted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(FIX / "msvd" / "test_list.txt", tmp_path / "test_list.txt")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"x": [_Boom()]}))
    with pytest.raises(DataError, match=r"raw-captions.pkl: expected a pickled dict.*posix.system is not allowed|nt.system"):
        read_dataset("msvd", tmp_path, "test")
    assert not (tmp_path / "boom.txt").exists()
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({"aaaaAAAA111_5_15": [["a", 3]]}))
    with pytest.raises(DataError, match=r"key 'aaaaAAAA111_5_15' caption 0: expected a list of token strings"):
        read_dataset("msvd", tmp_path, "test")
    (tmp_path / "raw-captions.pkl").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="raw-captions.pkl"):
        read_dataset("msvd", tmp_path, "test")


# -------------------------------------------------------------------------- DiDeMo
def test_didemo_paragraphs_match_published_paragraph_file(shared_data):
    ann = shared_data / "annotations" / "didemo"
    spec = read_dataset("didemo", ann, "test")
    paragraph = read_dataset("didemo", ann, "test", annotation_file=ann / "test_data_paragraph_fdvs.json")
    assert len(spec) == 1004 and len(paragraph) == 1003
    assert spec.max_frames == 64 and spec.paragraph and not spec.multi_caption_eval
    ours = {i.id: i.captions[0] for i in spec.items}
    # same paragraphs in the same sentence order (the published file keeps 7 stray newlines)
    assert all(ours[i.id].split() == i.captions[0].split() for i in paragraph.items)
    assert sum(ours[i.id] == i.captions[0] for i in paragraph.items) == 1003 - 7
    assert spec.items[0].start == 0.0 and spec.items[0].end == 30.0
    assert len(read_dataset("didemo", ann, "val")) == 1065


def test_didemo_orders_and_media_by_stem(tmp_path):
    anns = [
        {"video": "v1.mov", "description": "the end.", "times": [[4, 5], [4, 5], [3, 5]], "annotation_id": 1},
        {"video": "v1.mov", "description": "the start.", "times": [[0, 0], [0, 1], [0, 0], [0, 1]], "annotation_id": 2},
        {"video": "v1.mp4", "description": "the middle.", "times": [[2, 2], [2, 3], [2, 2]], "annotation_id": 3},
        {"video": "v2.", "description": "only one.", "times": [[1, 1]], "annotation_id": 4},
    ]
    (tmp_path / "train_data.json").write_text(json.dumps(anns))
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "v1.mp4").write_bytes(b"x")
    spec = read_dataset("didemo", tmp_path, "train")
    assert [i.id for i in spec.items] == ["v1", "v2"]
    assert spec.items[0].captions == ["the start. the middle. the end."]
    assert spec.items[0].media == str(tmp_path / "videos" / "v1.mp4") and spec.missing_media == 1
    clip4clip = read_dataset("didemo", tmp_path, "train", order="annotation")
    assert clip4clip.items[0].captions == ["the end. the start. the middle."]
    (tmp_path / "train_list.txt").write_text("v2.\n")
    assert [i.id for i in read_dataset("didemo", tmp_path, "train").items] == ["v2"]
    anns[2]["times"] = [[2, 2], [2]]
    (tmp_path / "train_data.json").write_text(json.dumps(anns))
    with pytest.raises(DataError, match=r"train_data.json: \[2\]\.times\[1\]: expected \[start, end\]"):
        read_dataset("didemo", tmp_path, "train")


# --------------------------------------------------------------------- ActivityNet
def test_activitynet_paragraphs_and_media_names(shared_data, tmp_path):
    src = shared_data / "annotations" / "activitynet"
    raw = json.loads((src / "val_1.json").read_text())
    spec = read_dataset("activitynet", src, "val_1")
    first = raw["v_uqiMw7tQ1Cc"]
    assert spec.items[0].captions == [" ".join(s.strip() for s in first["sentences"])]
    assert spec.items[0].start is None and spec.items[0].end is None
    assert len(read_dataset("activitynet", src, "train")) == len(json.loads((src / "train.json").read_text()))
    assert [i.id for i in read_dataset("activitynet", src, "test").items] == [i.id for i in spec.items]
    # files named v_<id>.mp4 or <id>.mkv are both found
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "v_uqiMw7tQ1Cc.mp4").write_bytes(b"x")
    ids = list(raw)
    (tmp_path / "videos" / f"{ids[1][2:]}.mkv").write_bytes(b"x")
    spec = read_dataset("activitynet", tmp_path, "val_1", annotations=src)
    assert spec.missing_media == 4917 - 2
    assert spec.items[1].media == str(tmp_path / "videos" / f"{ids[1][2:]}.mkv")


def test_activitynet_time_order_and_malformed(tmp_path):
    data = {"v_a": {"duration": 10.0, "timestamps": [[5.0, 9.0], [0.0, 4.0]], "sentences": ["Later.", " Earlier."]}}
    (tmp_path / "train.json").write_text(json.dumps(data))
    assert read_dataset("activitynet", tmp_path, "train").items[0].captions == ["Later. Earlier."]
    assert read_dataset("activitynet", tmp_path, "train", order="time").items[0].captions == ["Earlier. Later."]
    data["v_a"]["timestamps"] = [[0.0, 4.0]]
    (tmp_path / "train.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"train.json: key 'v_a'.timestamps: expected a list of 2 \[start, end\] pairs"):
        read_dataset("activitynet", tmp_path, "train")


# --------------------------------------------------------------------------- LSMDC
def test_lsmdc_fixture(tmp_path):
    train = read_dataset("lsmdc", FIX / "lsmdc", "train")
    assert [len(i.captions) for i in train.items] == [1, 2, 1]  # a repeated clip id is one item
    assert train.items[1].captions[1] == "She hands one mug to SOMEONE without a word."
    test = read_dataset("lsmdc", FIX / "lsmdc", "test")
    assert len(test) == 3 and test.missing_media == 2 and not test.multi_caption_eval
    assert test.items[0].media == str(FIX / "lsmdc" / "videos" / "3001_21_JUMP_STREET" /
                                      "3001_21_JUMP_STREET_00.00.31.230-00.00.33.180.avi")
    assert test.items[2].id == "3009_BATTLE_LOS_ANGELES_00.03.07.170-00.03.09.675"
    assert len(read_dataset("lsmdc", FIX / "lsmdc", "val")) == 1
    lines = (FIX / "lsmdc" / "LSMDC16_annos_val.csv").read_text().splitlines()
    (tmp_path / "LSMDC16_annos_val.csv").write_text(lines[0] + "\n" + "clip_x\t00.00.01.000\tSOMEONE waves.\n")
    with pytest.raises(DataError, match=r"LSMDC16_annos_val.csv: line 2: expected 6 tab-separated fields.*got '3 fields'"):
        read_dataset("lsmdc", tmp_path, "val")
    (tmp_path / "LSMDC16_annos_val.csv").write_text("clip_x\t00.00.01.000\tsoon\t1\t2\tSOMEONE waves.\n")
    with pytest.raises(DataError, match=r"line 1 field 3: expected a time"):
        read_dataset("lsmdc", tmp_path, "val")


# ------------------------------------------------------------------ COCO / Flickr30K
def test_karpathy_json_fixtures(tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(FIX / "karpathy", root / "annotations")
    (root / "val2014").mkdir(parents=True)
    (root / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"x")
    train = read_dataset("coco", root, "train")
    assert [i.id for i in train.items] == ["COCO_train2014_000000000009", "COCO_val2014_000000000073",
                                           "COCO_train2014_000000000025"]  # restval joins train
    assert train.items[0].kind == "image" and train.max_frames == 1
    test = read_dataset("coco", root, "test")
    assert len(test) == 2 and [len(i.captions) for i in test.items] == [5, 5] and test.multi_caption_eval
    assert test.items[0].media == str(root / "val2014" / "COCO_val2014_000000000042.jpg") and test.missing_media == 1
    assert test.items[1].media == str(root / "val2014" / "COCO_val2014_000000000133.jpg")
    assert len(read_dataset("coco", root, "test", max_captions=0).items[0].captions) == 6
    assert len(read_dataset("coco", root, "val")) == 1
    f30k = read_dataset("f30k", FIX / "karpathy", "test")
    assert f30k.name == "flickr30k" and [i.id for i in f30k.items] == ["1000344755"]
    assert f30k.items[0].captions[0] == "Someone on a ladder cleans a window."
    assert len(read_dataset("flickr30k", FIX / "karpathy", "train")) == 2


def test_karpathy_line_forms_on_shared(shared_data):
    ann = shared_data / "annotations"
    coco = read_dataset("coco", shared_data / "image" / "coco_karpathy_test", "test", annotations=ann / "coco")
    assert len(coco) == 5000 and coco.num_captions == 25000  # 10 images have a 6th caption
    assert read_dataset("coco", ann / "coco", "test", max_captions=0).num_captions == 25010
    # the 25 shared images are found under the flat folder despite the coco_dataset/val2014/ prefix
    assert coco.missing_media == 5000 - 25
    assert coco.items[0].id == "COCO_val2014_000000391895"
    f30k = read_dataset("flickr30k", ann / "flickr30k", "test")
    assert len(f30k) == 1000 and f30k.num_captions == 1000 and not f30k.multi_caption_eval
    assert f30k.items[0].media == str(ann / "flickr30k" / "flickr30k_images" / "3432637363.jpg")


# ------------------------------------------------------------------------ own data
def test_own_jsonl_fixture_and_cli(capsys):
    spec = read_dataset("jsonl", FIX / "own" / "train.jsonl", "train")
    assert [i.kind for i in spec.items] == ["image", "video", "video"]
    red = spec.items[0]
    assert red.id == "red" and red.media == str(FIX / "own" / "media" / "red.png")
    assert red.descriptions == ["an 8 by 8 pixel image filled with a single red colour"]
    assert spec.items[1].id == "media/clip.mp4#1.5-4.0" and (spec.items[1].start, spec.items[1].end) == (1.5, 4.0)
    assert spec.items[2].captions == ["the same clip, another segment"] and spec.items[2].end is None
    assert spec.missing_media == 2 and spec.multi_caption_eval and spec.kind == "mixed"
    # a folder with {split}.jsonl works too; the CLI takes the file path as DATASET
    assert [i.id for i in read_dataset("own", FIX / "own", "train").items] == [i.id for i in spec.items]
    info = inspect_json(capsys, str(FIX / "own" / "train.jsonl"))
    assert info["items"] == 3 and info["captions"] == 4 and info["missing_media"] == 2
    assert info["first_item"]["descriptions"] == red.descriptions


@pytest.mark.parametrize("line, message", [
    ('{"video": "a.mp4", "image": "b.jpg", "captions": ["x"]}', r"line 2: expected exactly one of the fields"),
    ('{"video": "a.mp4", "captions": []}', r"line 2 field 'captions': expected a non-empty list"),
    ('{"video": "a.mp4"}', r'line 2: expected a "captions" list'),
    ('{"video": "a.mp4", "captions": ["x"], "start": 5, "end": 2}', r"line 2 field 'end': expected a time after start=5"),
    ('{"image": "a.jpg", "captions": ["x"], "start": 1}', r"line 2: expected no start/end on an image"),
    ('{"video": "a.mp4", "captions": ["x"], "id": "one"}', r"line 2 field 'id': expected a unique id \(also on line 1\)"),
    ('{"video": "a.mp4", "captions": ["x"], "descriptions": [3]}', r"line 2 field 'descriptions'\[0\]"),
    ('{"video": "a.mp4", "captions": ["x"]', r"line 2: invalid JSON"),
])
def test_own_jsonl_errors_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"image": "z.jpg", "captions": ["first"], "id": "one"}\n' + line + "\n")
    with pytest.raises(DataError, match=r"mine.jsonl: " + message):
        read_dataset("jsonl", path, "test")


# ------------------------------------------------------------------------ registry
def test_registry_and_read_dataset_checks(tmp_path):
    assert set(READERS) == {"msrvtt", "msvd", "didemo", "activitynet", "lsmdc", "flickr30k", "coco", "jsonl"}
    with pytest.raises(XModalError, match="unknown dataset 'webvid'"):
        read_dataset("webvid", tmp_path, "test")
    with pytest.raises(XModalError, match=r"msrvtt: unknown option\(s\) order"):
        read_dataset("MSR-VTT", tmp_path, "test", order="time")
    with pytest.raises(DataError, match="does not exist"):
        read_dataset("msvd", tmp_path / "absent", "test")
    spec = read_dataset("lsmdc", FIX / "lsmdc", "test", drop_missing=True)
    assert isinstance(spec, DatasetSpec) and len(spec) == 1 and spec.missing_media == 2
    assert isinstance(spec.items[0], Item) and Path(spec.items[0].media).is_absolute()


# ------------------------------------------------------------------ protocol defaults
def test_protocol_defaults_match_readers_and_shipped_configs(shared_data):
    import yaml

    from xmodal.data.readers import protocol_defaults

    keys = {"num_frames", "max_words", "test_split", "train_split", "paragraph", "kind", "source"}
    assert keys <= set(protocol_defaults("didemo"))
    assert {k: protocol_defaults("didemo")[k] for k in ("num_frames", "max_words", "paragraph", "kind")} == \
        {"num_frames": 64, "max_words": 64, "paragraph": True, "kind": "video"}
    assert protocol_defaults("ANet")["test_split"] == "val_1" and protocol_defaults("anet")["num_frames"] == 64
    assert protocol_defaults("msr-vtt")["num_frames"] == 12 and protocol_defaults("msrvtt")["max_words"] == 32
    assert protocol_defaults("coco")["kind"] == "image" and protocol_defaults("f30k")["captions_per_item"] == 5
    assert "CLIP4Clip" in protocol_defaults("msvd")["source"]
    protocol_defaults("lsmdc")["num_frames"] = 99  # a copy: the table itself is not changed
    assert protocol_defaults("lsmdc")["num_frames"] == 12
    with pytest.raises(XModalError, match="unknown dataset 'webvid'"):
        protocol_defaults("webvid")
    # every shipped config evaluates the protocol's test split; the Cross-Modal Adapter ones
    # (whose paper the table cites) use its frames and words too (other methods' configs may
    # follow their own papers, e.g. MV-Adapter's 32 frames on ActivityNet)
    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    cma = [p for p in configs if "_cross_modal_adapter_" in p.name]
    assert len(cma) >= 7
    for path in configs:
        data = yaml.safe_load(path.read_text())["data"]
        proto = protocol_defaults(data["dataset"])
        assert data["eval_split"] == proto["test_split"], path.name
        assert read_split_name(data["dataset"], data["train_split"]) == read_split_name(data["dataset"], proto["train_split"])
        if path in cma:
            assert (data["num_frames"], data["max_words"]) == (proto["num_frames"], proto["max_words"]), path.name
    # the readers' test splits under the protocol's split names keep the published counts
    ann = shared_data / "annotations"
    counts = {"msrvtt": (ann / "msrvtt", 1000, 1000), "msvd": (ann / "msvd", 670, 27763),
              "didemo": (ann / "didemo", 1004, 1004), "activitynet": (ann / "activitynet", 4917, 4917),
              "coco": (ann / "coco", 5000, 25000), "flickr30k": (ann / "flickr30k", 1000, 1000)}
    for name, (root, n_items, n_captions) in counts.items():
        proto = protocol_defaults(name)
        spec = read_dataset(name, root, proto["test_split"])
        assert (len(spec), spec.num_captions) == (n_items, n_captions), name
        assert spec.max_frames == proto["num_frames"] and spec.paragraph == proto["paragraph"], name
        assert spec.kind == proto["kind"], name


def read_split_name(dataset: str, split: str) -> str:
    """MSR-VTT's `train` is its `train_9k`."""
    return "train_9k" if (dataset, split) == ("msrvtt", "train") else split
