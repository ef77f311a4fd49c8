"""Descriptions for MSTA on every benchmark (issue 13 point 4): a sidecar file keyed by item
id, kinds carried as `description_kinds` / `desc_kind`, `descriptions_per_kind` drawn per
epoch like captions."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from xmodal.data import EvalDataset, Item, TrainDataset, collate, read_dataset
from xmodal.data.dataset import VisualDataset
from xmodal.errors import DataError, XModalError

FIX = Path(__file__).resolve().parent / "fixtures"


def tokenize(texts, length=6):
    """Stand-in tokenizer: description 'd<k> ...' gets first token k + 1, any other text 0."""
    out = torch.zeros(len(texts), length, dtype=torch.long)
    for i, t in enumerate(texts):
        word = t.split()[0]
        out[i, 0] = int(word[1:]) + 1 if word[0] == "d" and word[1:].isdigit() else 0
    return out


def load(item, num_frames):
    return torch.zeros(num_frames, 3, 2, 2), torch.ones(num_frames, dtype=torch.bool)


def _sidecar(tmp_path, data, name="desc.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_sidecar_gives_msrvtt_items_kinded_descriptions(shared_data, tmp_path, caplog):
    side = _sidecar(tmp_path, {
        "video9770": {"spatial": ["a desk with a computer", "cables"], "temporal": ["plugs in, then types"]},
        "video9771": ["a gym"],
        "video_not_in_1kA": {"spatial": ["x"]}, "video_neither": ["y"]})
    with caplog.at_level(logging.WARNING):
        spec = read_dataset("msrvtt", shared_data / "video" / "msrvtt_1kA", "test",
                            annotations=shared_data / "annotations" / "msrvtt", descriptions=side,
                            descriptions_per_kind=1)
    first, second, third = spec.items[:3]
    assert first.descriptions == ["a desk with a computer", "cables", "plugs in, then types"]
    assert first.description_kinds == ["spatial", "spatial", "temporal"]
    assert second.descriptions == ["a gym"] and second.description_kinds == ["generic"]
    assert third.descriptions == [] and third.description_kinds == []
    assert spec.descriptions == str(side.resolve()) and spec.descriptions_per_kind == 1
    assert "descriptions for 2 of 1000 items" in spec.notes and "2 sidecar ids match no item" in spec.notes
    warned = [r.getMessage() for r in caplog.records if "desc.json" in r.getMessage()]
    assert len(warned) == 1 and "2 of 4 ids match no item of msrvtt test" in warned[0]


@pytest.mark.parametrize("data, message", [
    ({"v": {"spatail": ["x"]}}, r"desc.json: key 'v': unknown key 'spatail' \(did you mean 'spatial'\?\); "
                                r"allowed keys: spatial, temporal, generic"),
    ({"v": {"temporal": [3]}}, r"desc.json: key 'v'.temporal\[0\]: expected a non-empty string, got 3"),
    ({"v": {"temporal": {"a": 1}}}, r"desc.json: key 'v'.temporal: expected a list of strings"),
    ({"v": 7}, r"desc.json: key 'v': expected a list of strings or an object"),
    (["v"], r"desc.json: top level: expected an object of item id"),
])
def test_malformed_sidecar_is_one_line_naming_file_and_key(tmp_path, data, message):
    side = _sidecar(tmp_path, data)
    with pytest.raises(DataError, match=message) as err:
        read_dataset("lsmdc", FIX / "lsmdc", "test", descriptions=side)
    assert "\n" not in str(err.value)


def test_sidecar_checks(tmp_path):
    with pytest.raises(DataError, match=r"descriptions sidecar .*absent.json does not exist"):
        read_dataset("lsmdc", FIX / "lsmdc", "test", descriptions=tmp_path / "absent.json")
    with pytest.raises(XModalError, match=r"descriptions_per_kind=0; expected an integer >= 1"):
        read_dataset("lsmdc", FIX / "lsmdc", "test", descriptions_per_kind=0)
    # own JSONL descriptions and a sidecar entry for the same item: given twice is an error
    side = _sidecar(tmp_path, {"red": ["another"]})
    with pytest.raises(DataError, match=r"desc.json: key 'red': item already has descriptions from .*train.jsonl"):
        read_dataset("jsonl", FIX / "own" / "train.jsonl", "train", descriptions=side)


def test_own_jsonl_takes_list_or_kinded_descriptions(tmp_path):
    path = tmp_path / "own.jsonl"
    path.write_text(json.dumps({"video": "a.mp4", "captions": ["x"], "descriptions": ["d0 flat"]}) + "\n" +
                    json.dumps({"video": "b.mp4", "captions": ["y"],
                                "descriptions": {"temporal": ["d1 then"], "spatial": "d2 where"}}) + "\n")
    a, b = read_dataset("jsonl", path, "test").items
    assert a.description_kinds == ["generic"]
    assert b.descriptions == ["d2 where", "d1 then"] and b.description_kinds == ["spatial", "temporal"]
    path.write_text(json.dumps({"video": "a.mp4", "captions": ["x"], "descriptions": {"tempral": ["t"]}}) + "\n")
    with pytest.raises(DataError, match=r"line 1 field 'descriptions': unknown key 'tempral' \(did you mean 'temporal'"):
        read_dataset("jsonl", path, "test")
    with pytest.raises(DataError, match=r"2 descriptions but 1 description_kinds"):
        Item("x", "/x.mp4", "video", ["c"], descriptions=["a", "b"], description_kinds=["spatial"])
    with pytest.raises(DataError, match=r"description kind\(s\) \['colour'\]"):
        Item("x", "/x.mp4", "video", ["c"], descriptions=["a"], description_kinds=["colour"])


def _described():
    """Item 0: 5 spatial + 3 temporal; item 1: none; item 2: 2 generic."""
    return [
        Item("v0", "/x/v0.mp4", "video", ["c0"], descriptions=[f"d{k}" for k in range(8)],
             description_kinds=["spatial"] * 5 + ["temporal"] * 3),
        Item("v1", "/x/v1.mp4", "video", ["c1"]),
        Item("v2", "/x/v2.mp4", "video", ["c2"], descriptions=["d20", "d21"]),
    ]


def test_collate_emits_desc_kind_with_padding():
    ds = TrainDataset(_described(), tokenize, load, 1)
    batch = collate([ds[i] for i in range(3)])
    assert batch["desc_tokens"].shape == (3, 8, 6) and batch["desc_mask"].sum(1).tolist() == [8, 0, 2]
    assert batch["desc_kind"].dtype == torch.long
    assert batch["desc_kind"].tolist() == [[0] * 5 + [1] * 3, [-1] * 8, [2, 2] + [-1] * 6]
    assert ((batch["desc_kind"] >= 0) == batch["desc_mask"]).all()


def test_descriptions_per_kind_drawn_per_epoch_and_resumable():
    ds = TrainDataset(_described(), tokenize, load, 1, seed=3, descriptions_per_kind=2)

    def shown(dataset, epoch):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        return sample["desc_tokens"][:, 0].sub(1).tolist(), sample["desc_kind"].tolist()

    draws = [shown(ds, e) for e in range(12)]
    for tokens, kinds in draws:
        assert kinds == [0, 0, 1, 1]  # two of each kind, in file order
        assert all(t < 5 for t in tokens[:2]) and all(5 <= t < 8 for t in tokens[2:]) and tokens == sorted(tokens)
    assert len({tuple(t) for t, _ in draws}) > 3  # a new draw across epochs
    resumed = TrainDataset(_described(), tokenize, load, 1, seed=3, descriptions_per_kind=2)
    assert shown(resumed, 7) == draws[7]
    assert set(sum((t for t, _ in draws), [])) == set(range(8))  # every description gets its turn
    assert ds[2]["desc_kind"].tolist() == [2, 2]  # fewer than the cap: all kept
    # the gallery takes the first N of each kind, every time
    vis = VisualDataset(_described(), load, 1, tokenize=tokenize, descriptions_per_kind=2)
    assert vis[0]["desc_tokens"][:, 0].sub(1).tolist() == [0, 1, 5, 6]
    capped = TrainDataset(_described(), tokenize, load, 1, descriptions_per_kind=2, max_descriptions=3)
    assert capped[0]["desc_kind"].tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="descriptions_per_kind"):
        TrainDataset(_described(), tokenize, load, 1, descriptions_per_kind=0)


def test_from_spec_uses_the_specs_descriptions_per_kind(tmp_path):
    root = tmp_path / "lsmdc"
    shutil.copytree(FIX / "lsmdc", root)
    spec = read_dataset("lsmdc", root, "test")
    ids = [i.id for i in spec.items]
    side = _sidecar(tmp_path, {ids[0]: {"spatial": ["d1 a", "d2 b", "d3 c"], "temporal": ["d4 d"]}})
    spec = read_dataset("lsmdc", root, "test", descriptions=side, descriptions_per_kind=1)
    train = TrainDataset.from_spec(spec, tokenize, load)
    assert train.descriptions_per_kind == 1 and train[0]["desc_kind"].tolist() == [0, 1]
    for item in spec.items:  # make every clip present so the test set builds
        Path(item.media).parent.mkdir(parents=True, exist_ok=True)
        Path(item.media).touch()
    ev = EvalDataset.from_spec(spec, tokenize, load)
    assert ev.visuals.descriptions_per_kind == 1 and ev.visuals[0]["desc_tokens"][:, 0].tolist() == [2, 5]
