"""benchmarks/hubness.py: k-occurrence statistics of a saved similarity matrix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hub():
    spec = importlib.util.spec_from_file_location("hubness_bench", ROOT / "benchmarks" / "hubness.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(folder: Path, sim: np.ndarray) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    items = [f"v{j}" for j in range(sim.shape[1])]
    np.save(folder / "sims.npy", sim)
    (folder / "sims_ids.json").write_text(json.dumps(
        {"rows": [{"text": f"t{i}", "text_index": i, "item_id": items[i]} for i in range(sim.shape[0])],
         "columns": items}))
    return items


def test_no_hub_when_every_query_finds_its_own_item(hub, tmp_path):
    _write(tmp_path / "diag", np.eye(6) + 0.01 * np.arange(6)[None, :])
    sim, truth = hub.load(tmp_path / "diag")
    r = hub.hubness(sim, truth)
    assert r["top1_items"] == 6 and r["top1_max"] == 1 and r["R@1"] == 100.0


def test_one_hub_wins_every_query(hub, tmp_path):
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(20, 20)) * 0.1
    sim[:, 7] += 5.0  # item 7 scores highest for every query
    _write(tmp_path / "hub", sim)
    r = hub.hubness(*hub.load(tmp_path / "hub"))
    assert r["top1_items"] == 1 and r["top1_max"] == 20 and r["top1_share_top5"] == 1.0
    assert r["R@1"] == 5.0  # only query 7 is right
    assert hub.k_occurrence(hub.ranking(sim), 10)[7] == 20


def test_skewness_is_zero_for_a_flat_spread_and_positive_with_a_hub(hub):
    assert hub.skewness(np.full(10, 3)) == 0.0
    assert hub.skewness(np.array([10, 0, 0, 0, 0, 0])) > 1.0


def test_main_writes_json_and_names_a_missing_folder(hub, tmp_path, capsys):
    _write(tmp_path / "a", np.eye(4))
    out = tmp_path / "h.json"
    assert hub.main([str(tmp_path / "a"), "--out", str(out)]) == 0
    rec = json.loads(out.read_text())["results"][str(tmp_path / "a")]
    assert rec["top1_items"] == 4 and rec["run"] is None
    assert "provenance unknown" in capsys.readouterr().out
    run = {"pretrained": "xmodal", "weights_sha256": "ab" * 32, "adapter": None, "method": {"name": "zero_shot"}}
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({"t2v/R@1": 100.0, "run": run}))
    assert hub.main([str(tmp_path / "a"), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][str(tmp_path / "a")]["run"] == run
    assert "weights xmodal sha256" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="sims.npy: not found"):
        hub.main([str(tmp_path / "missing")])
