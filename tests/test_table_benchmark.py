"""benchmarks/table.py: rows, seed statistics, resumable runs and the written report."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    # imported by its own name from benchmarks/ (as the script does): --jobs' spawned workers
    # import the module that defines the run function again, by that name and sys.path
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import table as module

    assert Path(module.__file__).resolve() == ROOT / "benchmarks" / "table.py"
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
    assert len(groups) == 7
    for row in rows:
        cfg = config_from_dict({"method": row.method, **dict(row.options)})
        for key, value in row.options:
            assert getattr(cfg, key) == value
    defaults = [r for r in rows if not r.options]
    assert {r.slug for r in defaults} <= main  # one default per axis, trained once in the main table
    assert len({r.slug for r in rows}) == 13 + 3  # 13 non-default settings + the three default configs
    assert table.Row("x", "cross_modal_adapter", (("cmt", False),)).slug == "cross_modal_adapter-cmt=false"


ARGS = ["--backbone", "xmodal-test", "--pretrained", "none", "--videos", "20", "--order", "4", "--images", "12",
        "--test", "8",
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
    # every trained video model is also measured on the order subset, and the table shows it
    assert all(set(r["order_metrics"]) == set(r["metrics"]) for r in recs)
    assert "order_metrics" in video["cross_modal_adapter"]
    assert not (work / "runs").exists() or not any((work / "runs").rglob("*.safetensors"))  # run dirs cleaned

    # step time of every trained row, relative to full fine-tuning, at each set's batch shape
    assert video["projection"]["step_ms"] > 0 and "step_time_ratio" in video["projection"]
    speed = json.loads((out / "speed.json").read_text())
    assert speed["video"]["shape"]["frames"] == 2 and speed["image"]["shape"]["frames"] == 1

    md = (out / "table.md").read_text()
    assert "t2v R@1" in md and "t2i R@1" in md and "order subset" in md
    assert [c["id"] for c in report["claims"]] == ["C1", "C2", "C3", "C4", "C5"]
    assert "### claims" in md and "| C1 |" in md
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


# ------------------------------------------------------------- seed policy, claims, curves
def test_seed_policy_gives_the_claims_methods_every_seed_and_the_rest_one(table):
    import argparse

    rows = [table.Row("zero-shot", None), table.Row("cma", "cross_modal_adapter"), table.Row("lora", "lora"),
            table.Row("msta", "msta")]
    args = argparse.Namespace(seed_list=[0, 1, 2], set_list=["video"])
    jobs = [(row.slug, seed) for _, row, seed in table.run_order(args, rows, table.ablation_rows())]
    count = {slug: sum(1 for s, _ in jobs if s == slug) for slug in {s for s, _ in jobs}}
    assert count["zero_shot"] == 1 and count["lora"] == 1
    assert count["cross_modal_adapter"] == 3 and count["msta"] == 3
    assert count["cross_modal_adapter-share=down"] == 3 and count["msta-consistency_weight=0.0"] == 3
    assert count["cross_modal_adapter-d_s=0"] == 3 and count["mv_adapter-temporal=none"] == 3
    # ablation settings no claim is decided on run the first seed only
    assert count["cross_modal_adapter-d_s=32"] == 1 and count["cross_modal_adapter-positions=attn"] == 1
    assert count["mv_adapter-cmt=false"] == 1 and count["cross_modal_adapter-form=parallel"] == 1
    assert table.seeds_for(table.Row("x", "prompt_tuning"), [4, 5]) == [4]


def _rec(slug, values, key="metrics", set_name="video", trainable=1, total=1000):
    return [{"set": set_name, "row_slug": slug, "seed": k, key: {"t2v/R@1": v}, "trainable": trainable,
             "total": total} for k, v in enumerate(values)]


def test_compare_verdicts_follow_the_two_pooled_std_rule(table):
    assert table.compare([10, 11, 12], [5, 6, 7])["verdict"] == "reproduced"
    assert table.compare([5, 6, 7], [10, 11, 12])["verdict"] == "not reproduced"
    res = table.compare([10, 12, 14], [9, 11, 13])  # diff 1, pooled std 2
    assert res["verdict"] == table.INCONCLUSIVE and res["diff"] == pytest.approx(1.0)
    assert res["pooled_std"] == pytest.approx(2.0)
    assert table.compare([10.0], [5.0])["verdict"] == table.INCONCLUSIVE  # no spread to judge by
    # "within 1 point": a 0.5-point deficit is within the margin, a 3-point one is not
    assert table.compare([9.5, 9.6, 9.4], [10.0, 10.1, 9.9], margin=1.0)["verdict"] == "reproduced"
    assert table.compare([7.0, 7.1, 6.9], [10.0, 10.1, 9.9], margin=1.0)["verdict"] == "not reproduced"


def test_claims_are_computed_from_the_records(table):
    cma, uni, ft = "cross_modal_adapter", "uni_adapter", "full_finetune"
    records = (_rec(cma, [20, 21, 22]) + _rec(uni, [10, 11, 12]) + _rec(ft, [20.4, 20.5, 20.6], trainable=1000)
               + _rec("mv_adapter", [40, 41, 42], "order_metrics") + _rec("mv_adapter-temporal=none", [40, 43, 39],
                                                                          "order_metrics")
               + _rec(f"{cma}-share=down", [15, 16, 17]) + _rec(f"{cma}-d_s=0", [10, 11, 12])
               + _rec("msta", [5, 6, 7]) + _rec("msta-consistency_weight=0.0", [9, 10, 11]))
    verdicts = {c["id"]: c for c in table.claims(records)}
    assert verdicts["C1"]["verdict"] == "reproduced" and verdicts["C1"]["diff"] == pytest.approx(10.0)
    assert verdicts["C2"]["verdict"] == "reproduced" and verdicts["C2"]["trainable_pct"] == pytest.approx(0.1)
    assert verdicts["C3"]["verdict"] == table.INCONCLUSIVE
    assert verdicts["C4"]["verdict"] == "reproduced"
    assert verdicts["C5"]["verdict"] == "not reproduced"
    # the same gap at >= 1 % trainable parameters does not satisfy C2; a missing row is "not run"
    big = [dict(r, trainable=50) if r["row_slug"] == cma else r for r in records]
    assert {c["id"]: c for c in table.claims(big)}["C2"]["verdict"] == "not reproduced"
    assert {c["id"]: c for c in table.claims(records[3:])}["C1"]["verdict"] == "not run"
    md = table.claims_markdown(table.claims(records))
    assert "| C5 |" in md and "not reproduced" in md


def test_plateau_and_budget_from_curves(table):
    import math

    decay = [2.0 * math.exp(-i / 30) + 0.5 for i in range(400)]  # settles ~ step 90-120
    step = table.plateau_step(decay)
    assert 60 < step < 150
    assert table.plateau_step([1.0] * 50) == 1  # flat from the start
    still_falling = [3.0 - 0.005 * i for i in range(300)]
    assert table.plateau_step(still_falling) > 280  # never settles: the whole run
    curves = {"video/a": {"set": "video", "plateau_step": 40}, "video/b": {"set": "video", "plateau_step": 95},
              "image/a": {"set": "image", "plateau_step": 30}}
    rec = table.recommend_budget(curves, {"video": 18, "image": 31})
    assert rec["epochs"] == 6 and rec["slowest"] == "video/b"  # ceil(95 / 18)


def test_curves_mode_writes_the_figure_and_a_budget_the_table_can_run_at(table, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--backbone", "xmodal-test", "--pretrained", "none", "--images", "12", "--test", "4", "--batch", "4",
            "--sets", "image", "--methods", "projection", "--curves", "--curve-epochs", "2", "--threads", "1",
            "--out", str(out), "--work", str(work)]
    assert table.main(argv) == 0
    curves = json.loads((out / "curves.json").read_text())
    curve = curves["curves"]["image/projection"]
    assert curve["updates"] == 2 * 2 and len(curve["losses"]) == 4 and 1 <= curve["plateau_step"] <= 4
    assert curves["recommended"]["epochs"] == math.ceil(curve["plateau_step"] / 2)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the curves keep the lr constant after the warm-up (a decaying lr flattens any curve by itself)
    assert curves["protocol"]["schedule"] == "constant lr after warm-up"
    record = json.loads((out / "curves" / "image" / "projection.json").read_text())
    assert record["protocol"]["schedule"] == "constant lr after warm-up"
    args = table.parse_args([])
    row = table.Row("projection", "projection")
    assert table.run_config(args, "video", tmp_path, row, 0).train.min_lr_ratio == 0.0  # the table: cosine to 0
    args.constant_lr = True
    assert table.run_config(args, "video", tmp_path, row, 0).train.min_lr_ratio == 1.0
    args = table.parse_args(["--budget-from", str(out / "curves.json")])
    assert (args.epochs, args.video_steps, args.image_steps) == (curves["recommended"]["epochs"], 0, 0)
    # per method: each trains to its own plateau; --uniform-budget: the slowest one's, for all
    assert args.budget == {"image": {"projection": math.ceil(curve["plateau_step"] / 2)}}
    assert table.parse_args(["--budget-from", str(out / "curves.json"), "--uniform-budget"]).budget is None


def test_parallel_runs_write_the_records_a_serial_run_writes(table, tmp_path):
    """--jobs 2 trains in spawned processes; every record's numbers equal the serial run's."""
    argv = ARGS + ["--sets", "video", "--no-speed", "--seeds", "0"]
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert table.main(argv + ["--out", str(serial), "--work", str(tmp_path / "w1")]) == 0
    assert table.main(argv + ["--out", str(parallel), "--work", str(tmp_path / "w2"), "--jobs", "2"]) == 0

    def numbers(out):
        recs = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in (out / "records").rglob("*.json")}
        return {k: (r["metrics"], r.get("order_metrics"), r.get("losses")) for k, r in recs.items()}

    assert numbers(serial) == numbers(parallel) and len(numbers(serial)) == 3
    assert "2 runs at a time" in json.loads((parallel / "table.json").read_text())["machine"]


def test_budget_stops_new_runs_and_says_which_are_missing(table, tmp_path, capsys):
    argv = ARGS + ["--sets", "video", "--no-speed", "--seeds", "0", "--out", str(tmp_path / "out"),
                   "--work", str(tmp_path / "work"), "--budget-s", "0"]
    assert table.main(argv) == 1
    err = capsys.readouterr().err
    assert "--budget-s 0 ran out: 3 run(s) not started" in err and "cross_modal_adapter seed 0" in err
    assert not list((tmp_path / "out" / "records").rglob("*.json"))
    with pytest.raises(SystemExit):
        table.parse_args(["--jobs", "0"])


def test_budget_from_refuses_curves_with_methods_missing(table, tmp_path, capsys):
    curves = tmp_path / "curves.json"
    curves.write_text(json.dumps({"recommended": {"epochs": 3}, "missing": ["video/vpt"]}))
    with pytest.raises(SystemExit):
        table.parse_args(["--budget-from", str(curves)])
    assert "video/vpt" in capsys.readouterr().err


def test_frozen_prefix_cache_is_part_of_the_protocol_and_changes_no_result(table, tmp_path):
    argv = ARGS + ["--sets", "video", "--no-speed", "--seeds", "0", "--methods", "projection"]
    assert table.main(argv + ["--out", str(tmp_path / "plain"), "--work", str(tmp_path / "w")]) == 0
    assert table.main(argv + ["--out", str(tmp_path / "cached"), "--work", str(tmp_path / "w"),
                              "--cache-frozen-prefix"]) == 0
    plain, cached = (json.loads((tmp_path / d / "records" / "video" / "projection" / "seed0.json").read_text())
                     for d in ("plain", "cached"))
    assert "cache_frozen_prefix" not in plain["protocol"] and cached["protocol"]["cache_frozen_prefix"] is True
    assert cached["frozen_prefix_cache"]["depth"] == {"vision": 2, "text": 2} and "frozen_prefix_cache" not in plain
    assert cached["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    assert cached["metrics"] == pytest.approx(plain["metrics"], abs=1e-6)


def test_per_method_budget_trains_each_method_to_its_own_plateau(table, tmp_path):
    """--budget-from: a run trains ceil(plateau / steps per epoch) epochs of its method (ablations:
    their method's), the record says how many, and a method without a curve is refused up front."""
    steps = 3  # 12 train items / batch 4
    curves = {"recommended": {"epochs": 2, "steps_per_epoch": {"video": steps}},
              "curves": {"video/projection": {"set": "video", "method": "projection", "plateau_step": 2},
                         "video/cross_modal_adapter": {"set": "video", "method": "cross_modal_adapter",
                                                       "plateau_step": 5}}}
    path = tmp_path / "curves.json"
    path.write_text(json.dumps(curves))
    assert table.per_method_budget(curves) == {"video": {"projection": 1, "cross_modal_adapter": 2}}
    argv = ARGS + ["--sets", "video", "--no-speed", "--seeds", "0", "--budget-from", str(path),
                   "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert table.main(argv) == 0
    recs = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out" / "records").rglob("seed0.json")}
    assert (recs["projection"]["epochs"], recs["cross_modal_adapter"]["epochs"]) == (1, 2)
    train_items = recs["projection"]["updates"]  # full epochs: updates = epochs x steps per epoch
    assert recs["cross_modal_adapter"]["updates"] == 2 * train_items
    assert recs["projection"]["protocol"]["budget"] == {"video": {"projection": 1, "cross_modal_adapter": 2}}
    assert "projection 1" in (tmp_path / "out" / "table.md").read_text()
    with pytest.raises(SystemExit, match="no curve of video/msta"):
        table.main(argv[:argv.index("--methods") + 1] + ["msta"] + argv[argv.index("--methods") + 2:])


def test_claims_ablations_are_the_settings_the_claims_compare(table):
    rows = table.claim_ablation_rows()
    assert {r.slug for r in rows if r.options} == table.CLAIM_ABLATIONS
    assert {r.group for r in rows} == {"CMA: shared dimension d_s", "CMA: what is shared",
                                       "MV-Adapter: temporal adaptation", "MSTA: consistency loss"}
    args = table.parse_args(["--ablations", "claims"])
    assert args.ablations == "claims" and table.parse_args(["--no-ablations"]).ablations == "none"
