"""Annotation mistakes that used to change what is read without a word (issue 12): typos in
optional keys, NaN / reversed segments, one file under two spellings, an unbalanced CSV
quote, repeated JSON keys. Each is now an error naming the file and the line (or key);
formats that legitimately repeat an item (one record per caption) are merged."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import pytest

from xmodal.data import read_dataset
from xmodal.errors import DataError

FIX = Path(__file__).resolve().parent / "fixtures"


# ------------------------------------------------------------------------ own JSONL
def _jsonl(tmp_path, *records, raw=None):
    path = tmp_path / "mine.jsonl"
    path.write_text(raw if raw is not None else "\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_unknown_key_is_an_error_with_did_you_mean(tmp_path):
    path = _jsonl(tmp_path, {"video": "a.mp4", "captions": ["x"]},
                  {"video": "b.mp4", "captions": ["y"], "strat": 3.0, "end": 9.0})
    with pytest.raises(DataError) as err:
        read_dataset("jsonl", path, "test")
    msg = str(err.value)
    assert msg.startswith(f"{path}: line 2: unknown key 'strat' (did you mean 'start'?)")
    assert "allowed keys: video, image, captions, caption, descriptions, id, start, end" in msg
    path = _jsonl(tmp_path, {"video": "a.mp4", "captions": ["x"], "colour": "red"})
    with pytest.raises(DataError, match=r"line 1: unknown key 'colour'; allowed keys"):
        read_dataset("jsonl", path, "test")


@pytest.mark.parametrize("value, shown", [("NaN", "nan"), ("Infinity", "inf"), ("-1", "-1")])
def test_segment_values_must_be_finite_and_non_negative(tmp_path, value, shown):
    path = _jsonl(tmp_path, raw='{"video": "a.mp4", "captions": ["x"]}\n'
                                f'{{"video": "b.mp4", "captions": ["y"], "start": {value}, "end": 4}}\n')
    with pytest.raises(DataError, match=rf"mine.jsonl: line 2 field 'start': expected a finite number of seconds >= 0, "
                                        rf"got -?{shown}"):
        read_dataset("jsonl", path, "test")


def test_start_must_be_before_end(tmp_path):
    path = _jsonl(tmp_path, {"video": "a.mp4", "captions": ["x"], "start": 4.0, "end": 4.0})
    with pytest.raises(DataError, match=r"line 1 field 'end': expected a time after start=4, got 4.0"):
        read_dataset("jsonl", path, "test")


def test_same_file_under_two_spellings_is_one_media(tmp_path):
    path = _jsonl(tmp_path, {"video": "clips/a.mp4", "captions": ["x"]}, {"video": "./clips//a.mp4", "captions": ["y"]})
    with pytest.raises(DataError, match=r"mine.jsonl: line 2: expected each media file once \(also on line 1; "
                                        r"put all its captions on one line\)"):
        read_dataset("jsonl", path, "test")
    # two segments of one video are two legitimate items; ids come from the normalised path
    path = _jsonl(tmp_path, {"video": "./clips/a.mp4", "captions": ["x"], "end": 3.0},
                  {"video": "clips/a.mp4", "captions": ["y"], "start": 3.0})
    spec = read_dataset("jsonl", path, "test")
    assert [i.id for i in spec.items] == ["clips/a.mp4#-3.0", "clips/a.mp4#3.0-"]
    assert spec.items[0].media == spec.items[1].media == str(tmp_path / "clips" / "a.mp4")


def test_repeated_json_key_and_both_caption_fields(tmp_path):
    path = _jsonl(tmp_path, raw='{"video": "a.mp4", "video": "b.mp4", "captions": ["x"]}\n')
    with pytest.raises(DataError, match=r"mine.jsonl: line 1: key 'video' appears twice in one object"):
        read_dataset("jsonl", path, "test")
    path = _jsonl(tmp_path, {"video": "a.mp4", "captions": ["x"], "caption": "y"})
    with pytest.raises(DataError, match=r"line 1: expected one of the fields \"captions\" and \"caption\", not both"):
        read_dataset("jsonl", path, "test")


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"image": "a.jpg", "captions": ["x"]}).encode() + b"\n")
    assert read_dataset("jsonl", path, "test").items[0].id == "a.jpg"


# --------------------------------------------------------------------------- MSR-VTT
def test_msrvtt_unbalanced_quote_is_an_error_naming_the_line(tmp_path):
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n"
        "ret0,msr0,video0,a man is cooking\n"
        'ret1,msr1,video1,"a woman sings\n'
        "ret2,msr2,video2,a dog runs\n"
        "ret3,msr3,video3,a car drives\n")
    with pytest.raises(DataError, match=r"MSRVTT_JSFUSION_test.csv: line 3: a quoted field runs over lines 3-5 "
                                        r"\(unbalanced quote\?\)"):
        read_dataset("msrvtt", tmp_path, "test")
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr0,video0,a man, cooking\n")
    with pytest.raises(DataError, match=r"line 2: expected 4 comma-separated fields .*got '5 fields'"):
        read_dataset("msrvtt", tmp_path, "test")


def test_msrvtt_bom_and_duplicate_ids_name_both_lines(shared_data, tmp_path):
    src = shared_data / "annotations" / "msrvtt" / "MSRVTT_JSFUSION_test.csv"
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    spec = read_dataset("msrvtt", tmp_path, "test")
    assert len(spec) == 1000 and spec.items[0].id == "video9770"
    lines = src.read_text().splitlines()
    (tmp_path / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(lines[:4] + [lines[2]]) + "\n")
    with pytest.raises(DataError, match=r"line 5: expected each video_id once \(also on line 3;"):
        read_dataset("msrvtt", tmp_path, "test")
    ann = tmp_path / "ann"
    shutil.copytree(FIX / "msrvtt", ann)
    (ann / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo1\n\nvideo0\n")
    with pytest.raises(DataError, match=r"MSRVTT_train.9k.csv: line 5: expected each video_id once \(also on line 2\)"):
        read_dataset("msrvtt", tmp_path, "train", annotations=ann)


# ------------------------------------------------------------------ COCO / Flickr30K
def test_karpathy_one_record_per_caption_is_merged(tmp_path):
    records = [{"image": "val2014/a.jpg", "caption": "first"}, {"image": "val2014/b.jpg", "caption": "other"},
               {"image": "./val2014/a.jpg", "caption": "second"}]
    path = tmp_path / "coco_karpathy_test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    spec = read_dataset("coco", tmp_path, "test")
    assert [(i.id, i.captions) for i in spec.items] == [("a", ["first", "second"]), ("b", ["other"])]
    # a file of caption lists lists each image once: a repeat is an error naming both lines
    records = [{"image": "val2014/a.jpg", "caption": ["x", "y"]}, {"image": "val2014//a.jpg", "caption": ["z"]}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    with pytest.raises(DataError, match=r"coco_karpathy_test.jsonl: line 2: expected each image once \(also line 1;"):
        read_dataset("coco", tmp_path, "test")


def test_karpathy_json_repeated_image(tmp_path):
    data = json.loads((FIX / "karpathy" / "dataset_flickr30k.json").read_text())
    test = [img for img in data["images"] if img["split"] == "test"][0]
    data["images"].append(dict(test))
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"dataset_flickr30k.json: images\[\d+\]\.filename: expected each image once"):
        read_dataset("flickr30k", tmp_path, "test")


# ------------------------------------------------------------------ DiDeMo / ANet
def test_didemo_segments_and_keys(tmp_path):
    anns = [{"video": "v1.mov", "description": "a.", "times": [[0, 6]]}]
    (tmp_path / "train_data.json").write_text(json.dumps(anns))
    with pytest.raises(DataError, match=r"train_data.json: \[0\]\.times\[0\]: expected \[start, end\] segment indices "
                                        r"with 0 <= start <= end <= 5, got \[0, 6\]"):
        read_dataset("didemo", tmp_path, "train")
    anns = [{"video": "v1.mov", "description": "a.", "times": [[3, 1]]}]
    (tmp_path / "train_data.json").write_text(json.dumps(anns))
    with pytest.raises(DataError, match=r"times\[0\]: expected .* got \[3, 1\]"):
        read_dataset("didemo", tmp_path, "train")
    # the moment form lists a video once per description: ./v1.mov is the same video
    anns = [{"video": "v1.mov", "description": "one.", "times": [[0, 0]]},
            {"video": "./v1.mov", "description": "two.", "times": [[1, 1]]}]
    (tmp_path / "train_data.json").write_text(json.dumps(anns))
    assert [i.captions for i in read_dataset("didemo", tmp_path, "train").items] == [["one. two."]]
    para = {"v1.mov": {"caption": "x"}, "v1.mp4": {"caption": "y"}}
    (tmp_path / "val_data_paragraph_fdvs.json").write_text(json.dumps(para))
    with pytest.raises(DataError, match=r"key 'v1.mp4': expected one entry per video \(key 'v1.mov' is the same video\)"):
        read_dataset("didemo", tmp_path, "val")


def test_activitynet_timestamps(tmp_path, caplog):
    def write(data):
        (tmp_path / "train.json").write_text(json.dumps(data))

    write({"v_a": {"duration": 10.0, "timestamps": [[0.0, float("nan")]], "sentences": ["x"]}})
    with pytest.raises(DataError, match=r"key 'v_a'.timestamps\[0\]: expected a finite number of seconds >= 0, got nan"):
        read_dataset("activitynet", tmp_path, "train")
    write({"v_a": {"duration": 10.0, "timestamps": [[0.0, 1.0]], "sentences": ["x"]},
           "a": {"duration": 10.0, "timestamps": [[0.0, 1.0]], "sentences": ["y"]}})
    with pytest.raises(DataError, match=r"key 'a': expected one entry per video \(key 'v_a' is the same video\)"):
        read_dataset("activitynet", tmp_path, "train")
    # reversed / overlong stamps occur in the published files: a warning, items unaffected
    write({"v_a": {"duration": 10.0, "timestamps": [[5.0, 2.0], [0.0, 30.0]], "sentences": ["x", "y"]}})
    with caplog.at_level(logging.WARNING):
        spec = read_dataset("activitynet", tmp_path, "train")
    assert spec.items[0].captions == ["x y"] and "2 odd sentence timestamps" in spec.notes
    assert any("train.json: 2 sentence timestamps" in r.getMessage() for r in caplog.records)


def test_activitynet_real_train_reads_with_a_warning(shared_data, caplog):
    src = shared_data / "annotations" / "activitynet"
    with caplog.at_level(logging.WARNING):
        spec = read_dataset("activitynet", src, "train")
    # 2 stamps with start > end; ends past the duration by under a second are rounding, not counted
    assert len(spec) == 10009 and "2 odd sentence timestamps" in spec.notes


# ---------------------------------------------------------------- LSMDC / MSVD
def test_lsmdc_end_before_start(tmp_path):
    (tmp_path / "LSMDC16_annos_val.csv").write_text(
        "clip_a\t00.00.01.000\t00.00.03.000\t00.00.01.000\t00.00.03.000\tSOMEONE waves.\n"
        "clip_b\t00.00.05.000\t00.00.04.500\t00.00.05.000\t00.00.06.000\tSOMEONE sits.\n")
    with pytest.raises(DataError, match=r"LSMDC16_annos_val.csv: line 2 field 3: expected an end time after the start "
                                        r"00.00.05.000, got '00.00.04.500'"):
        read_dataset("lsmdc", tmp_path, "val")


def test_msvd_repeated_json_key_and_pkl_bom_free(tmp_path):
    (tmp_path / "test_gt.json").write_text('{"vid1": ["a cat"],\n "vid1": ["a dog"]}')
    with pytest.raises(DataError, match=r"test_gt.json: key 'vid1' appears twice in one object"):
        read_dataset("msvd", tmp_path, "test")
    shutil.copy(FIX / "msvd" / "test_list.txt", tmp_path / "test_list.txt")
    (tmp_path / "raw-captions.pkl").write_bytes(pickle.dumps({}))
    (tmp_path / "test_list.txt").write_text("aaaaAAAA111_5_15\n\naaaaAAAA111_5_15\n")
    with pytest.raises(DataError, match=r"test_list.txt: line 3: expected each id once \(also on line 1\)"):
        read_dataset("msvd", tmp_path, "test")
