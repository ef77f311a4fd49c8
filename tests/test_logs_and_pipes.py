"""Output that reads well outside a terminal: plain progress lines, quiet broken pipes, integer update axes."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest

from xmodal.progress import PlainProgress, progress


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_writes_plain_lines_to_a_file_not_carriage_returns():
    stream = io.StringIO()
    with progress(8, desc="videos", unit="clip", enabled=True, stream=stream, every_s=1e9) as bar:
        for _ in range(8):
            bar.update(1)
        bar.set_postfix(loss="0.5")
    text = stream.getvalue()
    assert "\r" not in text
    lines = text.strip().splitlines()
    # 25% steps -> 4 lines for 8 updates, each a complete statement
    assert len(lines) == 4
    assert lines[0].startswith("videos: 2/8 clip (25%)")
    assert lines[-1].startswith("videos: 8/8 clip (100%)")


def test_progress_is_a_bar_on_a_terminal_and_silent_when_disabled():
    from tqdm import tqdm

    tty = _FakeTTY()
    bar = progress(3, desc="x", enabled=True, stream=tty)
    assert isinstance(bar, tqdm)
    bar.close()
    quiet = io.StringIO()
    with progress(3, desc="x", enabled=None, stream=quiet) as bar:  # None: terminals only
        bar.update(3)
    assert quiet.getvalue() == ""


def test_plain_progress_emits_a_final_line_once():
    stream = io.StringIO()
    bar = PlainProgress(None, desc="gallery", unit="batch", stream=stream, every_s=1e9)
    bar.update(5)
    bar.close()
    bar.close()
    assert stream.getvalue().count("gallery: 5 batch") == 1


def test_broken_pipe_exits_quietly(tmp_path):
    data = tmp_path / "own.jsonl"
    data.write_text("".join(f'{{"id": "v{i}", "video": "v{i}.mp4", "captions": ["caption {i}"]}}\n'
                            for i in range(3000)))
    cmd = (f"{sys.executable} -m xmodal data inspect {data} --json | head -c 10 >/dev/null")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr, proc.stderr


def test_plot_update_axis_has_integer_ticks(tmp_path):
    from xmodal.engine.plot import plot_run

    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kind", "epoch", "step", "loss", "t2v/R@1", "v2t/R@1"])
        w.writeheader()
        for step in (1, 2, 3):
            w.writerow({"kind": "step", "epoch": 1, "step": step, "loss": 1.0 / step})
        w.writerow({"kind": "epoch", "epoch": 1, "step": 3, "t2v/R@1": 10.0, "v2t/R@1": 12.0})

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    seen = []
    real_close = plt.close

    def spy(fig=None):
        if fig is not None and hasattr(fig, "axes"):
            seen.extend(t for ax in fig.axes for t in ax.get_xticks())
        return real_close(fig)

    plt.close = spy
    try:
        written = plot_run(run)
    finally:
        plt.close = real_close
    assert {p.name for p in written} == {"loss.png", "recall.png"}
    assert seen and all(float(t).is_integer() for t in seen), seen
    # files written with the user's umask, not mkstemp's 0600
    mode = (run / "loss.png").stat().st_mode & 0o777
    assert mode & 0o044, oct(mode)


def test_progress_resumes_part_way():
    stream = io.StringIO()
    with progress(8, desc="epoch 1/2", unit="sample", enabled=True, stream=stream, every_s=1e9, initial=4) as bar:
        bar.update(4)
    assert stream.getvalue().strip().splitlines()[-1].startswith("epoch 1/2: 8/8 sample (100%)")


def test_training_log_file_has_no_carriage_returns(tmp_path):
    """`xmodal train ... 2> log`: plain lines, not a tqdm bar redrawn with \\r."""
    import yaml

    from test_train_engine import make_own_data

    data = make_own_data(tmp_path)
    cfg = {"data": {"dataset": "jsonl", "root": str(data), "num_frames": 2, "max_words": 16, "num_workers": 0},
           "model": {"backbone": "xmodal-test", "pretrained": "random"},
           "method": {"name": "cross_modal_adapter", "r": 4, "d_s": 8},
           "train": {"epochs": 1, "batch_size": 4, "device": "cpu", "tensorboard": False}, "eval": {"batch_size": 4}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "xmodal", "train", "--config", str(tmp_path / "cfg.yaml"),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    assert "epoch 1/1: 8/8 sample (100%)" in proc.stderr
