"""benchmarks/table.py: rows, seed statistics, resumable runs and the written report."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("xmodal_table_benchmark", ROOT / "benchmarks" / "table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_mean_std_is_sample_std(table):
    assert table.mean_std([1.0, 2.0, 6.0]) == (3.0, pytest.approx(statistics.stdev([1, 2, 6])))
    assert table.mean_std([4.5]) == (4.5, 0.0)


def test_main_rows_cover_every_registered_method_in_paper_order(table):
    from xmodal.methods import list_methods

    rows = table.main_rows()
    assert rows[0].method is None and rows[0].slug == "zero_shot"
    names = [r.method for r in rows[1:]]
    assert sorted(names) == sorted(list_methods())
    assert names[:5] == ["full_finetune", "partial", "projection", "uni_adapter", "cross_modal_adapter"]
    with pytest.raises(SystemExit, match="unknown method"):
        table.main_rows(["cross_modal_adapter", "no_such_method"])


def test_ablation_rows_are_valid_configs_and_defaults_reuse_main_runs(table):
    from xmodal.methods.base import config_from_dict

    main = {r.slug for r in table.main_rows()}
    rows = table.ablation_rows()
    groups = {r.group for r in rows}
    assert len(groups) == 6
    for row in rows:
        cfg = config_from_dict({"method": row.method, **dict(row.options)})
        for key, value in row.options:
            assert getattr(cfg, key) == value
    defaults = [r for r in rows if not r.options]
    assert {r.slug for r in defaults} <= main  # one default per axis, trained once in the main table
    assert len({r.slug for r in rows}) == 12 + 2  # 12 non-default settings + the two default configs
    assert table.Row("x", "cross_modal_adapter", (("cmt", False),)).slug == "cross_modal_adapter-cmt=false"


ARGS = ["--backbone", "xmodal-test", "--pretrained", "none", "--videos", "16", "--images", "12", "--test", "8",
        "--batch", "4", "--frames", "2", "--video-steps", "1", "--image-steps", "1", "--seeds", "0,1",
        "--methods", "projection,cross_modal_adapter", "--no-ablations", "--no-memory", "--speed-rounds", "1",
        "--threads", "1"]


def test_table_end_to_end_resumes_and_reports(table, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ARGS + ["--out", str(out), "--work", str(work)]
    assert table.main(argv) == 0

    runs = sorted((out / "records").glob("*/*/seed*.json"))
    # zero-shot once per set, 2 methods x 2 seeds per set
    assert len(runs) == 2 * (1 + 2 * 2)
    report = json.loads((out / "table.json").read_text())
    assert report["seeds"] == [0, 1]
    video = {e["slug"]: e for e in report["tables"]["video"]}
    assert list(video) == ["zero_shot", "projection", "cross_modal_adapter"]

    # cells are mean / sample std of the per-seed records
    recs = [json.loads(p.read_text()) for p in (out / "records" / "video" / "cross_modal_adapter").glob("seed*.json")]
    vals = [r["metrics"]["t2v/R@1"] for r in recs]
    cell = video["cross_modal_adapter"]["metrics"]["t2v/R@1"]
    assert cell["mean"] == pytest.approx(statistics.fmean(vals))
    assert cell["std"] == pytest.approx(statistics.stdev(vals))
    assert video["zero_shot"]["trainable"] == 0 and video["zero_shot"]["seeds"] == [0]
    assert 0 < video["cross_modal_adapter"]["trainable"] < video["cross_modal_adapter"]["total"]
    assert all(r["updates"] == 1 for r in recs)
    assert not (work / "runs").exists() or not any((work / "runs").rglob("*.safetensors"))  # run dirs cleaned

    # step time of every trained row, relative to full fine-tuning, at each set's batch shape
    assert video["projection"]["step_ms"] > 0 and "step_time_ratio" in video["projection"]
    speed = json.loads((out / "speed.json").read_text())
    assert speed["video"]["shape"]["frames"] == 2 and speed["image"]["shape"]["frames"] == 1

    md = (out / "table.md").read_text()
    assert "t2v R@1" in md and "t2i R@1" in md
    spread = any(c["std"] > 0 for t in report["tables"].values() for e in t for c in e["metrics"].values())
    assert ("±" in md) == spread
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a second invocation trains nothing: every run already has its record
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    capsys.readouterr()
    assert table.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    printed = capsys.readouterr()
    assert "seed 0:" not in printed.out + printed.err

    # a changed protocol does not reuse the old records
    assert table.main(ARGS + ["--no-speed", "--sets", "image", "--out", str(out), "--work", str(work),
                                   "--lr", "0.002"]) == 0
    image_runs = sorted((out / "records" / "image").glob("*/seed*.json"))
    assert all(p.stat().st_mtime_ns != stamps[p] for p in image_runs)
    assert all(json.loads(p.read_text())["protocol"]["lr"] == 0.002 for p in image_runs)
