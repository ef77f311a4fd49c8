"""Resume from the middle of an epoch (train.save_every_steps), after a real kill -9, with
unreadable training items dropped on the way; and the one-line errors of a run directory."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_engine import _config_file, _rows, own_data  # noqa: F401 (fixture)
from xmodal.cli import main
from xmodal.engine.config import load_config
from xmodal.engine.sampler import EpochBatches
from xmodal.engine.train import fit
from xmodal.errors import DataError

QUIET = {"log": lambda *_: None}


def _step_rows(run):
    """The step rows as written (strings): equal rows mean bit-identical float32 losses."""
    return [{k: r[k] for k in ("step", "loss", "loss_t2v", "loss_v2t", "lr", "grad_norm", "logit_scale")}
            for r in _rows(run, "step")]


def _cfg(tmp_path, data, **train):
    train = {"epochs": 2, "batch_size": 2, "tensorboard": False, "eval_every": 0, "log_every": 2,
             "save_every_steps": 3, **train}
    return _config_file(tmp_path, data, **train)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, own_data):  # noqa: F811
    tmp = tmp_path_factory.mktemp("straight")
    run = tmp / "run"
    fit(load_config(_cfg(tmp, own_data)), run, **QUIET)
    return run


def test_mid_epoch_resume_reproduces_the_loss_curve(tmp_path, own_data, straight):  # noqa: F811
    cfg = load_config(_cfg(tmp_path, own_data))
    run = tmp_path / "run"
    fit(cfg, run, stop_after_steps=7, **QUIET)  # 4 updates/epoch: stopped inside epoch 2, as a kill would
    state = json.loads((run / "last/trainer_state.json").read_text())
    assert (state["epoch"], state["trainer"]["global_step"], state["sampler"]["step_in_epoch"]) == (1, 6, 2)
    rest = fit(cfg, run, resume=True, **QUIET)
    assert rest.global_step == 8
    assert _step_rows(run) == _step_rows(straight)
    a = load_file(str(straight / "last/adapter_model.safetensors"))
    b = load_file(str(run / "last/adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from xmodal.engine import train
    from xmodal.engine.config import load_config

    real_step = train.Trainer.step

    def step(self, micro):
        if self.global_step == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # in the middle of the next update
        return real_step(self, micro)

    train.Trainer.step = step
    train.fit(load_config(sys.argv[1], ["data.num_workers=2"]), sys.argv[2], log=lambda *_: None)
""")


@pytest.mark.slow  # a fresh interpreter and two loader workers: ~25 s on a shared 2-core machine
def test_kill_9_mid_epoch_then_resume_is_exact_with_two_workers(tmp_path, own_data, straight):  # noqa: F811
    cfg_file = _cfg(tmp_path, own_data)
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(cfg_file), str(run), "5"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((run / "last/trainer_state.json").read_text())["trainer"]["global_step"] == 4
    fit(load_config(cfg_file, ["data.num_workers=2"]), run, resume=True, **QUIET)
    assert _step_rows(run) == _step_rows(straight)


def _corrupt_first_batch(tmp_path, own_data, batch_size=2):  # noqa: F811
    """A copy of the data whose first training micro-batch of epoch 1 is entirely unreadable."""
    from xmodal.data import read_dataset

    root = tmp_path / "data"
    shutil.copytree(own_data, root)
    items = read_dataset("jsonl", str(root), "train", drop_missing=True).items
    first = next(iter(EpochBatches(len(items), batch_size, seed=7, epoch=0)))
    for i in first:
        Path(items[i].media).write_bytes(b"not a video at all")
    # the evaluation split keeps reading the intact copies
    rows = [json.loads(line) for line in (own_data / "test.jsonl").read_text().splitlines()]
    for r in rows:
        key = "video" if "video" in r else "image"
        r[key] = str(own_data / r[key])
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, sorted(first)


def bad_paths(root, indices):
    from xmodal.data import read_dataset

    items = read_dataset("jsonl", str(root), "train", drop_missing=True).items
    return [items[i].media for i in indices]


def test_an_all_unreadable_batch_is_dropped_and_resume_stays_exact(tmp_path, own_data):  # noqa: F811
    root, bad = _corrupt_first_batch(tmp_path, own_data)
    cfg = load_config(_cfg(tmp_path, root))
    straight = fit(cfg, tmp_path / "straight", **QUIET)  # used to fail: "ran out of batches"
    assert straight.global_step == 8 and sorted(straight.dropped_items) == bad
    state = json.loads((tmp_path / "straight/last/trainer_state.json").read_text())
    assert sorted(int(i) for i in state["sampler"]["dropped"]) == bad
    assert all(Path(why.split(":")[0]).name in {Path(items).name for items in bad_paths(root, bad)}
               for why in state["sampler"]["dropped"].values())
    # epoch 2 no longer asks for them: its batches leave the dropped items out
    plan = EpochBatches(8, 2, seed=7, epoch=1, exclude=bad)
    assert not set(bad) & {i for b in plan.round_batches(0) for i in b}
    run = tmp_path / "resumed"
    fit(cfg, run, stop_after_steps=5, **QUIET)
    fit(cfg, run, resume=True, **QUIET)
    assert _step_rows(run) == _step_rows(tmp_path / "straight")


def test_nothing_readable_is_one_error(tmp_path, own_data):  # noqa: F811
    root = tmp_path / "data"
    shutil.copytree(own_data, root)
    for f in root.iterdir():
        if f.suffix in (".mp4", ".png"):
            f.write_bytes(b"garbage")
    with pytest.raises(DataError, match="no readable training item left"):
        fit(load_config(_cfg(tmp_path, root)), tmp_path / "run", **QUIET)


def test_run_directory_errors_are_one_line(tmp_path, own_data, capsys):  # noqa: F811
    cfg_file = _cfg(tmp_path, own_data, epochs=1)
    # --out is an existing file
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", "--config", str(cfg_file), "--out", str(afile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(afile) in err[0] and "existing file" in err[0]
    # an output folder that cannot be created (its parent is a file)
    assert main(["train", "--config", str(cfg_file), "--out", str(afile / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(afile / "run") in err[0]

    run = tmp_path / "run"
    assert main(["train", "--config", str(cfg_file), "--out", str(run)]) == 0
    capsys.readouterr()
    rng = run / "last/rng.safetensors"
    rng_bytes = rng.read_bytes()
    rng.unlink()  # missing rng.safetensors
    assert main(["train", "--config", str(cfg_file), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rng.safetensors: missing" in err[0]
    rng.write_bytes(rng_bytes[:-7])  # truncated
    assert main(["train", "--config", str(cfg_file), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rng.safetensors" in err[0] and "truncated" in err[0]


def test_full_disk_while_appending_metrics_keeps_the_file_whole(tmp_path, monkeypatch):
    import errno

    from xmodal.atomic import WriteError
    from xmodal.engine import train

    log = train.RunLog(tmp_path, enabled=True, tensorboard=False)
    log.row({"kind": "step", "epoch": 1, "step": 1, "loss": 1.5})
    before = (tmp_path / "metrics.csv").read_text()

    class FullDisk:
        def __init__(self, f, **kw):
            self.f = f

        def writerow(self, row):
            self.f.write("step,1,2,0.9")  # part of a row, then the disk is full
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train.csv, "DictWriter", FullDisk)
    with pytest.raises(WriteError, match=r"no space left on device while writing .*metrics\.csv"):
        log.row({"kind": "step", "epoch": 1, "step": 2, "loss": 0.9})
    assert (tmp_path / "metrics.csv").read_text() == before
