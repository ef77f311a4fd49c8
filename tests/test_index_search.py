"""`xmodal index` / `xmodal search` and the gallery index behind them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.cli import main
from xmodal.engine.heads import SimilarityHead
from xmodal.errors import XModalError
from xmodal.retrieval_index import GalleryIndex

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 20),
           "white": (240, 240, 240), "purple": (140, 30, 160)}


@pytest.fixture
def image_set(tmp_path):
    lines = []
    for name, rgb in COLOURS.items():
        arr = np.zeros((40, 40, 3), np.uint8)
        arr[8:32, 8:32] = rgb
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
        lines.append(json.dumps({"id": name, "image": f"{name}.png", "captions": [f"a {name} square"]}))
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_index_then_search_matches_brute_force(image_set, tmp_path, capsys):
    out = tmp_path / "idx"
    rc = main(["index", "--dataset", "jsonl", "--root", str(image_set), "--split", "test", "--backbone",
               "xmodal-test", "--pretrained", "random", "--seed", "3", "--num-frames", "1", "--num-workers", "0", "--out", str(out)])
    assert rc == 0
    index = GalleryIndex.load(out)
    assert sorted(index.ids) == sorted(COLOURS) and index.meta["backbone"] == "xmodal-test"
    capsys.readouterr()
    queries = ["a red square", "a purple square"]
    assert main(["search", str(out), *queries, "-k", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [len(r["hits"]) for r in got] == [3, 3]
    # brute force with the same model: score every item with the head and sort
    from xmodal.backbones.factory import create_backbone
    from xmodal.encoding import encode_texts
    from xmodal.methods import AdaptedModel

    model = AdaptedModel(create_backbone("xmodal-test", seed=3))
    text = encode_texts(model, queries, max_words=index.meta["max_words"], progress=False)
    scores = SimilarityHead(**index.meta["head"])(text, index.frame_features, index.frame_mask)
    for q, row in enumerate(scores):
        want = [index.ids[i] for i in torch.argsort(row, descending=True)[:3].tolist()]
        assert [h["id"] for h in got[q]["hits"]] == want
        assert got[q]["hits"][0]["score"] == pytest.approx(float(row.max()), abs=1e-5)


def test_gallery_index_round_trip_and_errors(tmp_path):
    g = torch.Generator().manual_seed(0)
    feats, mask = torch.randn(5, 3, 8, generator=g), torch.ones(5, 3, dtype=torch.bool)
    mask[0, 2] = False
    index = GalleryIndex(feats, mask, list("abcde"), [f"/m/{c}.mp4" for c in "abcde"], {"backbone": "x"})
    index.save(tmp_path / "i")
    back = GalleryIndex.load(tmp_path / "i")
    assert back.ids == list("abcde") and torch.equal(back.frame_mask, mask)
    assert back.frame_features.dtype == torch.float16  # stored and loaded as float16 (memory-mappable)
    assert torch.equal(back.frame_features.float(), feats.half().float())
    assert torch.equal(back.frames([1, 3])[0], feats[[1, 3]].half().float())
    assert back.item(2) == {"id": "c", "media": "/m/c.mp4", "captions": []}
    hits = back.search(feats[3].mean(0, keepdim=True), k=2)[0]
    assert hits[0].id == "d" and [h.rank for h in hits] == [1, 2]
    assert back.search(feats[3].mean(0, keepdim=True), k=2)[0][0].row == 3
    with pytest.raises(XModalError, match="not found; build the index"):
        GalleryIndex.load(tmp_path / "nowhere")
    with pytest.raises(XModalError, match="3 ids"):
        GalleryIndex(feats, mask, list("abc"), list("abc"))


def test_index_written_by_the_previous_format_still_loads(tmp_path):
    import faiss
    from safetensors.torch import save_file

    from xmodal.engine.heads import mean_pool

    g = torch.Generator().manual_seed(2)
    feats, mask = torch.randn(4, 2, 8, generator=g), torch.ones(4, 2, dtype=torch.bool)
    d = tmp_path / "v1"
    d.mkdir()
    save_file({"frame_features": feats.half(), "frame_mask": mask.to(torch.uint8)}, str(d / "frame_features.safetensors"))
    (d / "gallery.json").write_text(json.dumps({"backbone": "x", "adapter": None, "ids": list("wxyz"),
                                                "media": [f"/m/{c}.mp4" for c in "wxyz"]}))
    flat = faiss.IndexFlatIP(8)
    flat.add(mean_pool(feats.half().float(), mask).numpy())
    faiss.write_index(flat, str(d / "mean_pooled.faiss"))
    index = GalleryIndex.load(d)
    assert index.ids == list("wxyz") and index.candidate_vectors == "mean"
    assert index.search(feats[2].mean(0), k=1)[0][0].id == "y"
