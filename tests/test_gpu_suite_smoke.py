"""The GPU suite's plumbing on CPU (`--smoke`): sections, budget, partial JSON, summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import encode_speed  # noqa: E402
import gpu_suite  # noqa: E402
import train_speed  # noqa: E402


def test_smoke_suite_writes_one_json_with_every_section(tmp_path):
    out = tmp_path / "suite.json"
    report = gpu_suite.run(gpu_suite.parse_args(["--smoke", "--sections", "train_32,encode", "--budget-s", "120",
                                                 "--out", str(out)]))
    saved = json.loads(out.read_text())
    assert saved["smoke"] is True and saved["environment"]["device"] == "cpu"
    assert set(saved["sections"]) == {"train_32", "encode"} and not saved["errors"]
    train = saved["sections"]["train_32"]
    assert train["baseline"] == "full_finetune[eager]"
    results = train["results"]
    assert results["full_finetune[eager]"]["step_time_ratio"] == 1.0
    cma = results["cross_modal_adapter[fused+bf16w]"]
    assert cma["variant"] == "fused+bf16w" and "bf16_frozen_weights" in cma["fast_path"]
    assert "fused_adapters" in cma["fast_path"] and cma["step_ms_median"] > 0
    assert results["msta[bf16w+ckpt]"]["method"] == "msta"
    enc = saved["sections"]["encode"]["xmodal-test"]["results"]
    assert set(enc) == {"autocast", "bf16", "pipeline"}
    assert all(r["frames_per_s"] > 0 and r["flops_per_frame"] > 0 for r in enc.values())
    assert "fraction_of_bf16_peak" not in enc["autocast"]  # no peak on a CPU
    assert saved["summary"]["train_32"]["fastest"]["cross_modal_adapter"]["step_time_ratio"] > 0
    assert report["summary"] == saved["summary"]


def test_a_failing_section_keeps_the_others_and_budget_skips(tmp_path, monkeypatch):
    out = tmp_path / "suite.json"

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(gpu_suite, "train_section", boom)
    gpu_suite.run(gpu_suite.parse_args(["--smoke", "--sections", "train_32,encode", "--budget-s", "60",
                                        "--out", str(out)]))
    saved = json.loads(out.read_text())
    assert "simulated" in saved["errors"]["train_32"] and "traceback" in saved["sections"]["train_32"]
    assert saved["sections"]["encode"]["xmodal-test"]["results"]  # measured although train failed
    gpu_suite.run(gpu_suite.parse_args(["--smoke", "--sections", "encode", "--budget-s", "0.1", "--out", str(out)]))
    assert "budget spent" in json.loads(out.read_text())["sections"]["encode"]["skipped"]


def test_variant_names_and_peak_table():
    assert train_speed.parse_variant("compile+bf16w") == "bf16w+compile"
    assert train_speed.parse_variant("eager") == "eager"
    with pytest.raises(SystemExit, match="unknown fast-path option"):
        train_speed.parse_variant("turbo")
    args = train_speed.parse_args(["--configs", "lora:bf16w,cross_modal_adapter"])
    assert args.config_list[0] == ("full_finetune", "eager")
    assert ("cross_modal_adapter", "eager") in args.config_list and ("lora", "bf16w") in args.config_list
    assert encode_speed.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert encode_speed.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert encode_speed.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert encode_speed.peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None
    assert gpu_suite.card_slug("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"


def test_shell_wrapper_refuses_clearly_without_wheels(tmp_path):
    """No open_clip and no wheelhouse -> one clear line, exit 2 (simulated with a python lacking them)."""
    fake = tmp_path / "python3"
    fake.write_text("#!/bin/sh\ncase \"$2\" in *open_clip*) exit 1;; esac\nexit 0\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "XMODAL_WHEELHOUSE": str(tmp_path / "none")})
    assert proc.returncode == 2
    assert "no wheels in" in proc.stderr and "GPU.md" in proc.stderr
