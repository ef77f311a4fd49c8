"""Missing and unreadable media never enter a gallery or a metric (issue 11 point 3).

On the real MSR-VTT 1k-A annotations with the 13 shared clips and on the 25 shared COCO
images plus 3 unreadable files: an error by default naming the count and the first
paths, the readable subset (marked partial) when allowed, never a zero feature row.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from xmodal.data import EvalDataset, Item, TrainDataset, VisualLoader, collate, read_dataset
from xmodal.data.items import require_media
from xmodal.data.media import MediaError, clip_transform
from xmodal.errors import DataError, MissingMediaError, UnreadableMediaError
from xmodal.metrics import retrieval_metrics


def _msrvtt(shared_data, **opts):
    return read_dataset("msrvtt", shared_data / "video" / "msrvtt_1kA", "test",
                        annotations=shared_data / "annotations" / "msrvtt", **opts)


# ------------------------------------------------------------------ missing files
def test_msrvtt_1ka_with_13_clips_is_an_error_listing_987_missing(shared_data):
    spec = _msrvtt(shared_data)
    assert len(spec) == 1000 and spec.missing_media == 987
    with pytest.raises(MissingMediaError) as err:
        EvalDataset.from_spec(spec)
    msg = str(err.value)
    assert "\n" not in msg
    assert "987 of 1000 media files are missing" in msg and "msrvtt test" in msg
    assert str(shared_data / "video" / "msrvtt_1kA") in msg and "--allow-missing" in msg
    first_missing = [i.media for i in spec.items if not i.media.endswith(
        tuple(p.name for p in (shared_data / "video" / "msrvtt_1kA").glob("*.mp4")))][:3]
    assert all(path in msg for path in first_missing)


def test_msrvtt_1ka_allow_missing_is_a_13_item_partial_set(shared_data):
    spec = _msrvtt(shared_data)
    ev = EvalDataset.from_spec(spec, allow_missing=True)
    manifest = json.loads((shared_data / "video" / "msrvtt_1kA" / "manifest.json").read_text())
    captions = {m["video_id"]: m["caption"] for m in manifest}
    assert ev.partial and ev.num_items_requested == 1000 and ev.num_texts_requested == 1000
    assert len(ev.missing_media) == 987 and ev.unreadable_media == []
    assert sorted(i.id for i in ev.items) == sorted(captions)
    assert len(ev.texts) == 13 and ev.text_to_visual.tolist() == list(range(13))
    # each kept item keeps its own caption, and only that: missing items take theirs along
    assert all(ev.texts[t] == captions[ev.items[v].id] for t, v in enumerate(ev.text_to_visual.tolist()))
    assert [spec.items[i].id for i in ev.kept_indices] == [i.id for i in ev.items]
    assert len(ev.visuals) == 13
    cov = ev.coverage()
    assert cov["items_requested"] == 1000 and cov["items"] == 13 and cov["missing_media"] == 987 and cov["partial"]


def test_a_split_matching_no_media_is_an_error_naming_root_and_split(shared_data, tmp_path):
    empty = tmp_path / "no_videos"
    empty.mkdir()
    spec = _msrvtt(shared_data, media_dir=empty)
    for allow in (False, True):
        with pytest.raises(DataError, match=r"msrvtt test \(root .*\): none of the 1000 media files exists") as err:
            EvalDataset.from_spec(spec, allow_missing=allow)
        assert type(err.value) is DataError  # not a MissingMediaError: --allow-missing cannot help
        assert str(empty / "video9770.mp4") in str(err.value)
    with pytest.raises(DataError, match=r"my split: the split has no items"):
        require_media([], "my split")


def test_drop_missing_at_read_time_still_makes_a_partial_test_set(shared_data):
    spec = _msrvtt(shared_data, drop_missing=True)
    assert len(spec) == 13 and spec.missing_media == 987 and len(spec.dropped_media) == 987
    assert spec.dropped_media[0].endswith("video7020.mp4")
    with pytest.raises(MissingMediaError, match="987 of 1000 media files are missing"):
        EvalDataset.from_spec(spec)
    ev = EvalDataset.from_spec(spec, allow_missing=True)
    assert ev.partial and ev.num_items_requested == 1000 and len(ev.missing_media) == 987
    assert ev.items == spec.items and ev.kept_indices == list(range(13))


def test_complete_split_is_not_partial(shared_data, tmp_path):
    spec = _msrvtt(shared_data)
    for item in spec.items:  # give every clip a (placeholder) file
        item.media = str(tmp_path / f"{item.id}.mp4")
        Path(item.media).touch()
    ev = EvalDataset.from_spec(spec)
    assert not ev.partial and ev.num_items_requested == len(ev.items) == 1000 and ev.missing_media == []
    assert ev.coverage()["partial"] is False and ev.kept_indices == list(range(1000))


# ------------------------------------------------------------------ unreadable files
@pytest.fixture
def coco_with_broken(shared_data, tmp_path):
    """The 25 shared COCO images (linked) plus 3 unreadable .jpg files, as items with captions."""
    src = shared_data / "image" / "coco_karpathy_test"
    manifest = json.loads((src / "manifest.json").read_text())
    folder = tmp_path / "images"
    folder.mkdir()
    items = []
    for k, entry in enumerate(manifest):
        name = entry["image"].rsplit("/", 1)[-1]
        (folder / name).symlink_to(src / name)
        items.append(Item(id=name[:-4], media=str(folder / name), kind="image", captions=entry["captions"][:5]))
        if k % 9 == 4:  # broken files interleaved: positions 5, 15, 25 of the gallery
            bad = folder / f"broken{k}.jpg"
            bad.write_bytes(b"\xff\xd8 truncated jpeg" if k < 20 else b"")
            items.append(Item(id=bad.stem, media=str(bad), kind="image", captions=[f"broken {k} {j}" for j in range(5)]))
    assert len(items) == 28
    return items


def _gallery_index(ev: EvalDataset, batch_size: int, num_workers: int = 0):
    """What an evaluation loop sees: the `index` of every batch collate kept."""
    loader = DataLoader(ev.visuals, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    batches = [b for b in loader if b is not None]
    return torch.cat([b["index"] for b in batches] or [torch.zeros(0, dtype=torch.long)]), batches


def test_unreadable_gallery_items_are_reported_and_dropped_consistently(coco_with_broken, tiny_backbone):
    load = VisualLoader(clip_transform(tiny_backbone.image_size))
    ev = EvalDataset(coco_with_broken, None, load, 1, where="coco test (root x)")
    assert not ev.partial and len(ev.texts) == 140
    encoded, batches = _gallery_index(ev, batch_size=4)
    failed = ev.unreadable_indices(encoded)
    broken = [i for i, item in enumerate(ev.items) if item.id.startswith("broken")]
    assert failed == broken == ev.visuals.failed_indices and len(failed) == 3
    assert set(ev.visuals.failures_by_index) == set(broken)

    with pytest.raises(UnreadableMediaError, match=r"coco test \(root x\): 3 of 28 media files could not be decoded"):
        ev.drop_unreadable(failed, allow=False)
    sub = ev.drop_unreadable(failed)
    assert sub.partial and sub.unreadable_media == [ev.items[i].media for i in broken]
    assert sub.num_items_requested == 28 and len(sub.items) == 25 and len(sub.texts) == 125
    assert not any(t.startswith("broken") for t in sub.texts)
    assert [ev.texts[i] for i in sub.kept_text_indices] == sub.texts
    assert [ev.items[i] for i in sub.kept_indices] == sub.items
    assert all(sub.items[v].captions.count(sub.texts[t]) for t, v in enumerate(sub.text_to_visual.tolist()))
    assert ev.drop_unreadable([]) is ev
    with pytest.raises(IndexError):
        ev.drop_unreadable([28])

    # the metrics of the subset, taken from the full gallery's rows, are those of the clean
    # 25-image set: no zero rows left behind to be ranked
    tokenize = functools.partial(tiny_backbone.tokenize, max_words=32)
    with torch.no_grad():
        rows = torch.cat([tiny_backbone.encode_visual(b["pixels"].flatten(0, 1)).squeeze(1) for b in batches])
        full = torch.zeros(len(ev.items), rows.shape[1])
        full[encoded] = rows
        text = tiny_backbone.encode_text(tokenize(ev.texts))
    norm = torch.nn.functional.normalize
    clean = EvalDataset([i for i in coco_with_broken if not i.id.startswith("broken")], None, load, 1)
    assert clean.texts == sub.texts
    sim_sub = norm(text[sub.kept_text_indices], dim=-1) @ norm(full[sub.kept_indices], dim=-1).T
    assert (full[sub.kept_indices].abs().sum(1) > 0).all()
    clean_rows = full[[i for i in range(28) if i not in broken]]
    sim_clean = norm(text[[i for i, t in enumerate(ev.texts) if not t.startswith("broken")]], dim=-1) @ norm(clean_rows, dim=-1).T
    assert retrieval_metrics(sim_sub, sub.text_to_visual) == retrieval_metrics(sim_clean, clean.text_to_visual)


def test_nothing_decodable_is_an_error(tmp_path):
    bad = [tmp_path / f"b{k}.jpg" for k in range(2)]
    for b in bad:
        b.write_bytes(b"nope")
    ev = EvalDataset([Item(b.stem, str(b), "image", ["x"]) for b in bad], None, VisualLoader(clip_transform(32)), 1)
    encoded, _ = _gallery_index(ev, batch_size=2)
    with pytest.raises(DataError, match=r"none of the 2 media files could be decoded"):
        ev.drop_unreadable(ev.unreadable_indices(encoded))


def test_train_dataset_reports_failures_by_index(tmp_path):
    def load(item, num_frames):
        if item.id == "b":
            raise MediaError(item.media, "moov atom not found")
        return torch.zeros(num_frames, 3, 2, 2), torch.ones(num_frames, dtype=torch.bool)

    ds = TrainDataset([Item(k, f"/x/{k}.mp4", "video", ["c"]) for k in "abc"], lambda t: torch.zeros(len(t), 4), load, 2)
    assert [ds[i] is None for i in range(3)] == [False, True, False]
    assert ds.failures_by_index == {1: "moov atom not found"} and ds.failed_indices == [1]
    assert ds.failures == {"/x/b.mp4": "moov atom not found"}
