"""The gallery index refuses bad input and never leaves a half-written or mismatched index behind."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.atomic import WriteError
from xmodal.cli import main
from xmodal.engine.heads import SimilarityHead
from xmodal.errors import XModalError
from xmodal.retrieval_index import GalleryIndex, IndexFileError, portable_path, text_conditioned_scores


def _gallery(n=6, f=3, d=8, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, f, d, generator=g) * 4
    mask = torch.ones(n, f, dtype=torch.bool)
    ids = [f"v{i}" for i in range(n)]
    return GalleryIndex(feats, mask, ids, [f"/m/{i}.mp4" for i in ids], {"backbone": "x"}, **kw), feats


def _write_images(root, names, corrupt=(), missing=()):
    lines = []
    for i, name in enumerate(names):
        if name not in missing:
            if name in corrupt:
                (root / f"{name}.png").write_bytes(b"not a png at all")
            else:
                arr = np.zeros((36, 36, 3), np.uint8)
                arr[6:30, 6:30] = (40 * i % 256, 200 - 30 * i % 200, 90)
                Image.fromarray(arr).save(root / f"{name}.png")
        lines.append(json.dumps({"id": name, "image": f"{name}.png", "captions": [f"square number {name}"]}))
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    return root


INDEX_ARGS = ["--dataset", "jsonl", "--split", "test", "--backbone", "xmodal-test", "--pretrained", "random", "--seed", "3",
              "--num-frames", "1", "--num-workers", "0"]


# ----------------------------------------------------------------- queries
def test_empty_query_is_refused(tmp_path, capsys):
    index, _ = _gallery()
    index.save(tmp_path / "idx")
    assert main(["search", str(tmp_path / "idx"), "  "]) == 2
    err = capsys.readouterr().err
    assert "query 1 is empty" in err and err.count("\n") == 1
    with pytest.raises(XModalError, match="no query"):
        index.search(torch.zeros(0, 8), k=3)
    with pytest.raises(XModalError, match="not finite"):
        index.search(torch.full((1, 8), float("nan")), k=3)
    with pytest.raises(XModalError, match="all zeros"):
        index.search(torch.zeros(1, 8), k=3)


# ----------------------------------------------------------------- features
def test_non_finite_or_zero_feature_rows_are_refused():
    g = torch.Generator().manual_seed(0)
    feats, mask = torch.randn(5, 3, 8, generator=g), torch.ones(5, 3, dtype=torch.bool)
    bad = feats.clone()
    bad[2, 1, 4] = float("nan")
    with pytest.raises(XModalError, match=r"item 2 \('c'\) is not finite"):
        GalleryIndex(bad, mask, list("abcde"), list("abcde"))
    zero = feats.clone()
    zero[4] = 0  # what an unreadable item used to become
    with pytest.raises(XModalError, match=r"item 4 \('e'\) is all zeros"):
        GalleryIndex(zero, mask, list("abcde"), list("abcde"))


def test_faiss_padding_never_becomes_the_last_item():
    # 4 IVF lists probed one at a time: FAISS pads short results with -1 (once mapped to ids[-1])
    index, feats = _gallery(n=60, f=2, d=8, faiss_factory="IVF4,Flat", faiss_train_size=60, faiss_params="nprobe=1")
    hits = index.search(feats[:5].mean(1), k=40)
    for row in hits:
        ids = [h.id for h in row]
        assert len(ids) == len(set(ids)) and all(0 <= h.row < 60 for h in row)
        assert len(row) < 40  # one probed list holds fewer than 40 items: fewer hits, none invented


def test_fast_exact_text_conditioned_scores_equal_the_head():
    g = torch.Generator().manual_seed(1)
    text, frames = torch.randn(4, 16, generator=g) * 5, torch.randn(9, 5, 16, generator=g) * 5
    mask = torch.rand(9, 5, generator=g) > 0.4
    mask[2] = False
    for head in (SimilarityHead("text_conditioned", 5.0, False), SimilarityHead("text_conditioned", 0.05, True)):
        want = head(text, frames, mask)
        got = text_conditioned_scores(text, frames, mask, head.temperature, head.normalize)
        assert torch.allclose(got, want, atol=1e-5)
        index = GalleryIndex(frames, mask, [str(i) for i in range(9)], [""] * 9, candidate_vectors="mean")
        assert torch.allclose(index.score_all(text, head), want, atol=1e-5)  # chunked, cached Gram matrices


def test_frame_candidates_with_all_items_equal_exact_search():
    index, feats = _gallery(n=40, f=4, d=16, candidate_vectors="frames")
    assert index.faiss.ntotal == 160 and index.meta["faiss"]["vectors"] == "frames"
    head = SimilarityHead("text_conditioned", 5.0)
    text = torch.randn(3, 16, generator=torch.Generator().manual_seed(5)) * 4
    two_stage = index.search(text, k=5, rerank=head, candidates=40)
    exact = index.search(text, k=5, rerank=head, exact=True)
    assert [[h.id for h in r] for r in two_stage] == [[h.id for h in r] for r in exact]


# ----------------------------------------------------------------- FAISS factory
def test_faiss_factory_strings_are_checked():
    with pytest.raises(XModalError, match=r"'IVF64,PQ4' needs at least 256 training points .* has 6 items"):
        _gallery(faiss_factory="IVF64,PQ4")
    with pytest.raises(XModalError, match="not a FAISS index factory string"):
        _gallery(faiss_factory="Bogus77")
    index, feats = _gallery(n=50, faiss_factory="HNSW32")
    assert index.meta["faiss"]["factory"] == "HNSW32"
    assert index.search(feats[7].mean(0), k=1)[0][0].id == "v7"


def test_cli_faiss_flag_too_few_items(tmp_path, capsys):
    root = _write_images(tmp_path, list("abcd"))
    assert main(["index", *INDEX_ARGS, "--root", str(root), "--faiss", "IVF16,Flat", "--out",
                 str(tmp_path / "i")]) == 2
    assert "needs at least 16 training points" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()


# ----------------------------------------------------------------- storage
def test_interrupted_overwrite_keeps_the_previous_index(tmp_path, monkeypatch):
    old, old_feats = _gallery(seed=0)
    old.save(tmp_path / "idx")
    new = GalleryIndex(old_feats.flip(0) * 2, old.frame_mask, [f"n{i}" for i in range(6)], old.media)
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # killed between the two renames of the swap
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        new.save(tmp_path / "idx")
    monkeypatch.setattr(os, "replace", real_replace)
    back = GalleryIndex.load(tmp_path / "idx")
    assert back.ids == old.ids
    assert torch.equal(back.frame_features.float(), old_feats.half().float())
    assert back.search(old_feats[3].mean(0), k=1)[0][0].id == "v3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_disk_full_is_one_line_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    old, _ = _gallery(seed=0)
    old.save(tmp_path / "idx")
    new, _ = _gallery(seed=1)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError, match="no space left on device") as info:
        new.save(tmp_path / "idx")
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    assert GalleryIndex.load(tmp_path / "idx").ids == old.ids


@pytest.mark.parametrize("damage", ["truncate", "garbage", "swap", "pickle", "faiss", "json"])
def test_damaged_index_files_are_refused_by_name(tmp_path, damage, capsys):
    index, _ = _gallery(seed=0)
    index.save(tmp_path / "idx")
    feats = tmp_path / "idx" / "frame_features.safetensors"
    marker = tmp_path / "pwned"
    if damage == "truncate":
        feats.write_bytes(feats.read_bytes()[:-40])
    elif damage == "garbage":
        feats.write_bytes(os.urandom(feats.stat().st_size))
    elif damage == "swap":  # same shapes, from another index
        other, _ = _gallery(seed=9)
        other.save(tmp_path / "other")
        shutil.copy(tmp_path / "other" / "frame_features.safetensors", feats)
    elif damage == "pickle":  # a file that runs code when unpickled must not be unpickled
        class Evil:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        torch.save({"frame_features": Evil()}, feats)
    elif damage == "faiss":
        (tmp_path / "idx" / "mean_pooled.faiss").write_bytes(b"garbage" * 50)
    else:
        (tmp_path / "idx" / "gallery.json").write_text("{not json")
    name = {"faiss": "mean_pooled.faiss", "json": "gallery.json"}.get(damage, "frame_features.safetensors")
    with pytest.raises(IndexFileError, match=name):
        GalleryIndex.load(tmp_path / "idx")
    assert main(["search", str(tmp_path / "idx"), "a query"]) == 2
    err = capsys.readouterr().err
    assert name in err and err.count("\n") == 1
    assert not marker.exists()


def test_memory_mapped_load_gives_the_same_results(tmp_path):
    index, feats = _gallery(n=30, f=3, d=8)
    index.save(tmp_path / "idx")
    a, b = GalleryIndex.load(tmp_path / "idx", mmap=False), GalleryIndex.load(tmp_path / "idx", mmap=True)
    assert torch.equal(a.frame_features, b.frame_features)
    text = feats[:4].mean(1)
    assert [[h.id for h in r] for r in a.search(text, k=5)] == [[h.id for h in r] for r in b.search(text, k=5)]
    assert index.meta["faiss"]["factory"] == "Flat"


# ----------------------------------------------------------------- missing media
def test_missing_or_unreadable_media_is_an_error_or_a_recorded_partial_index(tmp_path, capsys):
    root = _write_images(tmp_path / "data", list("abcdef"), corrupt={"c"}, missing={"e"}) \
        if (tmp_path / "data").mkdir() is None else None
    out = tmp_path / "idx"
    assert main(["index", *INDEX_ARGS, "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 6 items have missing or unreadable media" in err and "e.png" in err and err.count("\n") == 1
    (root / "e.png").write_bytes((root / "a.png").read_bytes())  # e is back, c still undecodable
    assert main(["index", *INDEX_ARGS, "--root", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 of 6 items" in err and "c.png" in err
    assert not out.exists()
    os.remove(root / "e.png")
    assert main(["index", *INDEX_ARGS, "--root", str(root), "--out", str(out), "--allow-missing"]) == 0
    assert "partial index: 2 item(s) left out" in capsys.readouterr().out
    index = GalleryIndex.load(out)
    assert index.ids == ["a", "b", "d", "f"] and index.partial
    assert sorted(d["id"] for d in index.meta["dropped"]) == ["c", "e"]
    assert bool((index.frame_features.float().abs().sum(dim=(1, 2)) > 0).all())  # no zero rows
    assert main(["search", str(out), "square number a", "-k", "2"]) == 0
    assert "is partial: 2 item(s)" in capsys.readouterr().err


# ----------------------------------------------------------------- moved run folder
def test_moved_run_folder_still_resolves_adapter_and_media(tmp_path, capsys):
    from xmodal.backbones.factory import create_backbone
    from xmodal.methods import apply_method, make_config

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    root = _write_images(run / "data", list("abcd"))
    model = apply_method(create_backbone("xmodal-test", seed=3), make_config("lora"))
    model.save_adapter(run / "adapter")
    out = run / "idx"
    assert main(["index", *INDEX_ARGS, "--root", str(root), "--adapter", str(run / "adapter"), "--out", str(out)]) == 0
    stored = json.loads((out / "gallery.json").read_text())
    assert stored["adapter"] == os.path.join("..", "adapter")
    assert stored["media"][0] == os.path.join("..", "data", "a.png")
    capsys.readouterr()
    assert main(["search", str(out), "square number b", "-k", "4", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    moved = tmp_path / "elsewhere" / "run2"
    moved.parent.mkdir()
    shutil.move(str(run), str(moved))
    assert main(["search", str(moved / "idx"), "square number b", "-k", "4", "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert [h["id"] for h in after[0]["hits"]] == [h["id"] for h in before[0]["hits"]]
    assert [h["score"] for h in after[0]["hits"]] == pytest.approx([h["score"] for h in before[0]["hits"]])
    for h in after[0]["hits"]:
        assert h["media"].startswith(str(moved / "data")) and os.path.isfile(h["media"])
    assert GalleryIndex.load(moved / "idx").meta["adapter"] == str(moved / "adapter")


def test_portable_path_keeps_unrelated_trees_absolute(tmp_path):
    assert portable_path(tmp_path / "run" / "data" / "x.mp4", tmp_path / "run" / "idx") == "../data/x.mp4"
    assert portable_path("/usr/share/x.mp4", tmp_path / "idx") == "/usr/share/x.mp4"
