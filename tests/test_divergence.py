"""NaN/inf in training: never applied, never checkpointed, reported once with the last good checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from test_train_engine import _config_file, _rows, own_data  # noqa: F401 (fixture)
from xmodal.cli import main
from xmodal.engine.config import TrainConfig, load_config
from xmodal.engine.heads import SimilarityHead
from xmodal.engine.train import Trainer, TrainingDiverged, fit
from xmodal.methods import apply_method, make_config


def _batch(model, seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    captions = [f"caption number {i}" for i in range(n)]
    return {"tokens": model.tokenize(captions), "pixels": torch.randn(n, 3, 3, 32, 32, generator=g),
            "frame_mask": torch.ones(n, 3, dtype=torch.bool), "captions": captions}


def _snapshot(trainer):
    params = {n: p.detach().clone() for n, p in trainer.model.named_trainable_parameters()}
    state = {(i, k): v.clone() for i, st in enumerate(trainer.optimizer.state.values()) for k, v in st.items()}
    return params, state


def test_lr_1e6_stops_at_the_first_nan_and_keeps_the_good_checkpoint(tmp_path, own_data, tiny_backbone_factory):
    # the run: train.lr=1e6; a checkpoint after every update, metrics synced every 4 updates
    cfg = load_config(_config_file(tmp_path, own_data, epochs=6, tensorboard=False, eval_every=0, log_every=4,
                                   save_every_steps=1), ["train.lr=1e6"])
    model = apply_method(tiny_backbone_factory(7), cfg.method_config())
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as info:
        fit(cfg, run, model=model, log=lambda *_: None)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("training diverged at step 3 (loss=nan")
    assert f"last good checkpoint: {run / 'last'} (step 2)" in msg
    # the checkpoint is the state after update 2, finite, complete; nothing after it was applied
    state = json.loads((run / "last/trainer_state.json").read_text())
    assert state["trainer"]["global_step"] == 2
    saved = load_file(str(run / "last/adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())
    live = model.method.trainable_state(model.backbone)
    for k, v in saved.items():  # updates 3 and 4 ran before the sync but were not applied
        torch.testing.assert_close(live[k].detach(), v, rtol=0, atol=0)
    steps = _rows(run, "step")
    assert [int(r["step"]) for r in steps] == [1, 2, 3] and steps[-1]["loss"] == "nan"
    assert not (run / "metrics.json").exists()


def test_cli_prints_one_line(tmp_path, own_data, capsys):
    cfg_file = _config_file(tmp_path, own_data, epochs=6, tensorboard=False, eval_every=0, log_every=1)
    assert main(["train", "--config", str(cfg_file), "--out", str(tmp_path / "run"), "train.lr=1e6"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "training diverged at step 3 (loss=nan" in err[0]
    assert "last good checkpoint: " + str(tmp_path / "run" / "last") in err[0]


def test_a_nan_update_is_not_applied_and_the_trainer_stays_halted(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter", init="normal"))
    trainer = Trainer(model, SimilarityHead(), TrainConfig(lr=1e-3, precision="fp32"), total_steps=10)
    trainer.step([_batch(model, 0)])
    before, opt_before = _snapshot(trainer)
    bad = _batch(model, 1)
    bad["pixels"][0, 0, 0, 0, 0] = float("nan")
    trainer.step([bad])
    trainer.step([_batch(model, 2)])  # finite, but after the divergence: not applied either
    after, opt_after = _snapshot(trainer)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    for k in opt_before:
        torch.testing.assert_close(opt_after[k], opt_before[k], rtol=0, atol=0)  # step count included
    records = trainer.collect()
    assert [r.diverged for r in records] == [False, True, False]
    assert records[1].nonfinite and records[1].step == 2


def test_fp16_overflow_skips_one_update_and_lowers_the_scale(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter", init="normal"))
    trainer = Trainer(model, SimilarityHead(), TrainConfig(lr=1e-3, precision="fp16"), total_steps=10)
    trainer.scaler.load_state_dict({"scale": 2.0 ** 127})  # the scaled loss overflows
    before, _ = _snapshot(trainer)
    trainer.step([_batch(model, 0)])
    after, _ = _snapshot(trainer)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert trainer.scaler.get_scale() == 2.0 ** 126
    trainer.scaler.load_state_dict({"scale": 2.0 ** 10})
    trainer.step([_batch(model, 1)])
    (skipped, applied) = trainer.collect()
    assert skipped.skipped and not skipped.diverged
    assert not applied.skipped and not applied.diverged
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_trainable_parameters())
