"""benchmarks/prefix_cache_speed.py: both trainers see the same batches, the JSON says what it measured."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prefix_cache_speed_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import prefix_cache_speed

    out = tmp_path / "speed.json"
    assert prefix_cache_speed.main(["--methods", "projection,cross_modal_adapter", "--epochs", "2", "--videos", "20",
                                    "--test", "8", "--order", "4", "--batch", "4", "--frames", "2", "--threads", "1",
                                    "--backbone", "xmodal-test", "--pretrained", "none", "--work",
                                    str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    proj, cma = report["results"]
    assert proj["steps"] == 2 * (8 // 4) and proj["cache"]["depth"] == {"vision": 2, "text": 2}
    assert proj["cache"]["hits"] > 0 and 0 < proj["hit_rate"] <= 1
    # the two runs train alike: same batches, same initialisation (losses equal up to rounding)
    assert proj["max_relative_loss_difference"] < 1e-4
    # nothing below the Cross-Modal Adapter's first block is frozen: nothing cached, identical losses
    assert cma["cache"]["depth"] == {"vision": 0, "text": 0} and cma["hit_rate"] is None
    assert cma["max_relative_loss_difference"] == 0.0
