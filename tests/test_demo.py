"""`xmodal demo` (what `make demo` runs), end to end on a tiny world and the random-weight test model."""

from __future__ import annotations

import json

import pytest

from xmodal.cli import main


def test_demo_refuses_a_backbone_without_weights(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--set", "model.backbone=xmodal-test",
                 "--set", "model.pretrained=null"]) == 2
    assert "has no weights" in capsys.readouterr().err and not (tmp_path / "demo").exists()


def test_demo_end_to_end_writes_table_adapter_index_and_answer(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--videos", "24", "--test", "8", "--order", "8",
               "--set", "model.backbone=xmodal-test", "--set", "model.pretrained=random",
               "--set", "train.epochs=1", "--set", "train.batch_size=4", "--set", "data.num_frames=2",
               "--set", "data.num_workers=0", "--set", "eval.batch_size=8", "--set", "train.progress=false"])
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "demo_summary.json").read_text())

    # before/after table with both directions, main set then the order subset on their own lines
    assert "zero-shot" in printed and "+ cross_modal_adapter" in printed
    # the table says what it was measured on: here random weights, the trained adapter, the tie rule
    assert "RANDOM WEIGHTS" in printed and "ties mean" in printed.replace("tie policy", "ties"), printed
    assert summary["run"]["pretrained"] == "random" and summary["run"]["tie_policy"] == "mean"
    # the training settings it ran with (what benchmarks/demo_seeds.py copies into its record)
    assert summary["train"] == {"epochs": 1, "batch_size": 4, "lr": summary["train"]["lr"], "num_frames": 2,
                                "pooling": "text_conditioned"}
    assert len(summary["run"]["adapter_sha256"]) == 64 and summary["run"]["adapter_sha256"][:12] in printed
    table = (out / "demo_table.txt").read_text().splitlines()
    main_at = next(i for i, line in enumerate(table) if line.startswith("main test set: 8 captions x 8 videos"))
    order_at = next(i for i, line in enumerate(table) if line.startswith("order subset: 8 captions x 8 videos"))
    assert order_at == main_at + 3 and table[order_at + 1].startswith("zero-shot")
    assert table[order_at + 2].startswith("+ cross_modal_adapter")
    order = summary["order_subset"]
    assert order["videos"] == 8 and order["zero_shot"] != summary["zero_shot"]
    assert f"{order['adapted']['t2v/R@1']:>8.1f}" in table[order_at + 2]
    # the adapter on disk is only the method's tensors
    for key in ("t2v/R@1", "t2v/MdR", "v2t/MnR"):
        assert key in summary["zero_shot"] and key in summary["adapted"]
    assert 0 < summary["trainable"] and summary["adapter_bytes"] < 4 * summary["trainable"] + 64 * 1024
    assert (out / "run" / "best" / "adapter_model.safetensors").is_file()

    # the query is the first test caption; its clip's rank over the whole gallery is reported
    first = json.loads((out / "data" / "test.jsonl").read_text().splitlines()[0])
    assert summary["query"] == first["captions"][0]
    assert summary["ground_truth"] == first["id"]
    assert 1 <= summary["ground_truth_rank"] <= 8
    assert [h["rank"] for h in summary["top5"]] == [1, 2, 3, 4, 5]
    in_top5 = any(h["id"] == first["id"] for h in summary["top5"])
    assert in_top5 == (summary["ground_truth_rank"] <= 5)
    assert ("<- ground truth" in printed) == in_top5
    assert (out / "index").is_dir() and (out / "demo_table.txt").is_file()

    # the demo's index serves `xmodal search` (it records the model, adapter and pooling head)
    capsys.readouterr()
    assert main(["search", str(out / "index"), summary["query"], "-k", "5", "--candidates", "8", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    hits = answer[0]["hits"]
    # same scores up to the index's float16 storage (near-ties of the random model may swap)
    demo_scores = {h["id"]: h["score"] for h in summary["top5"]}
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in summary["top5"]], abs=5e-3)
    for h in hits:
        if h["id"] in demo_scores:
            assert h["score"] == pytest.approx(demo_scores[h["id"]], abs=5e-3)
