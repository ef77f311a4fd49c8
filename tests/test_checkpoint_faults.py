"""Crash safety of training checkpoints, by fault injection.

A forked child writes checkpoint B over checkpoint A and is killed (os._exit, i.e. no cleanup
runs) or interrupted (an exception unwinds it) at every step of the write; then a second child
runs the recovery and is killed at every step of *that*. After every kill some complete
checkpoint must load (hashes verified), it must be A or B — B exactly when the write got past
its commit point — and recovery must never go back to an older one.
"""

import os

import pytest
import torch

from xmodal.engine import checkpoint as ck
from xmodal.engine.optim import build_optimizer
from xmodal.methods import apply_method, make_config


@pytest.fixture(scope="module")
def model(tiny_backbone_factory):
    m = apply_method(tiny_backbone_factory(0), make_config("cross_modal_adapter", init="normal"))
    opt = build_optimizer(m.named_trainable_parameters(), 1e-3)
    for p in m.trainable_parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    return m, opt


def _set_version(m, version: int) -> None:
    with torch.no_grad():
        for i, p in enumerate(m.trainable_parameters()):
            p.fill_(version + i * 1e-3)


def _save(directory, m, opt, version: int):
    _set_version(m, version)
    return ck.save_training_checkpoint(directory, m, opt, {"version": version, "trainer": {"global_step": version}},
                                       [ck.capture_rng()])


def _loaded_version(directory, m, opt) -> int:
    """Load the checkpoint find_checkpoint picks (verifying hashes) and check the weights match."""
    found = ck.find_checkpoint(directory)
    assert found is not None, f"no complete checkpoint: {ck.describe_missing(directory)}"
    _set_version(m, -1)
    state = ck.load_training_checkpoint(found, m, opt)
    version = state["version"]
    first = next(iter(m.trainable_parameters()))
    assert float(first.detach().flatten()[0]) == pytest.approx(version)  # the weights of that same version
    return version


def _in_child(fn, kill_at: int, mode: str = "exit") -> bool:
    """Run fn() in a forked child whose checkpoint code dies at its `kill_at`-th step.
    True if fn finished before reaching that step."""
    pid = os.fork()
    if pid == 0:  # child
        calls = [0]

        def hook(name):
            calls[0] += 1
            if calls[0] == kill_at:
                if mode == "exit":
                    os._exit(17)
                raise KeyboardInterrupt(name)

        ck.FAULT_HOOK = hook
        try:
            fn()
        except BaseException:
            os._exit(18)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 17, 18), code
    return code == 0


def _steps(fn):
    names = []
    ck.FAULT_HOOK = names.append
    try:
        fn()
    finally:
        ck.FAULT_HOOK = None
    return names


@pytest.mark.parametrize("first_write", [False, True], ids=["overwrite", "first"])
def test_a_complete_checkpoint_survives_a_kill_at_every_step(tmp_path, model, first_write):
    m, opt = model
    probe = tmp_path / "probe" / "last"
    if not first_write:
        _save(probe, m, opt, 1)
    names = _steps(lambda: _save(probe, m, opt, 2))
    commit = names.index("write: manifest (commit point)") + 1
    assert len(names) >= 8 and "write: rename staged -> final" in names
    checked = 0
    for mode in ("exit", "raise"):
        for k in range(1, len(names) + 1):
            run = tmp_path / f"{mode}{k}"
            last = run / "last"
            if not first_write:
                _save(last, m, opt, 1)
            finished = _in_child(lambda: _save(last, m, opt, 2), k, mode)
            assert not finished
            if first_write and k < commit:
                assert ck.find_checkpoint(last) is None  # nothing was committed yet: nothing claims to be
                continue
            expected = 2 if k >= commit else 1
            assert _loaded_version(last, m, opt) == expected, (mode, k, names[k - 1])
            if mode == "raise":
                checked += 1
                continue
            # now kill the recovery at each of its steps, then let one finish
            for j in range(1, 50):
                done = _in_child(lambda: ck.recover_checkpoint(last), j)
                assert _loaded_version(last, m, opt) == expected, (k, names[k - 1], j)
                checked += 1
                if done:
                    break
            assert ck.recover_checkpoint(last) == last and _loaded_version(last, m, opt) == expected
            assert sorted(p.name for p in run.iterdir()) == ["last"]  # no stray temp/old/trash folders
            # and the next write goes through
            _save(last, m, opt, 3)
            assert _loaded_version(last, m, opt) == 3
            assert sorted(p.name for p in run.iterdir()) == ["last"]
    assert checked >= (len(names) - commit + 1) * 2


def test_the_reported_double_kill_keeps_the_staged_copy(tmp_path, model):
    """Kill between the two renames (only .last.old and .last.tmp exist, both complete), then kill
    the recovery right after it discards .last.old: .last.tmp must still be found and promoted."""
    m, opt = model
    last = tmp_path / "last"
    _save(last, m, opt, 1)
    probe = tmp_path / "probe"
    _save(probe / "last", m, opt, 1)
    names = _steps(lambda: _save(probe / "last", m, opt, 2))
    between = names.index("write: rename final -> previous") + 1
    _in_child(lambda: _save(last, m, opt, 2), between)
    assert not last.exists() and (tmp_path / ".last.old").is_dir() and (tmp_path / ".last.tmp").is_dir()
    # the recovery's steps from that state, probed on a copy
    import shutil

    copy = tmp_path / "probe2"
    copy.mkdir()
    for name in (".last.old", ".last.tmp"):
        shutil.copytree(tmp_path / name, copy / name)
    rec = _steps(lambda: ck.recover_checkpoint(copy / "last"))
    after_old_gone = rec.index("discard .last.old: delete") + 1
    _in_child(lambda: ck.recover_checkpoint(last), after_old_gone)
    assert not (tmp_path / ".last.old").exists()
    assert _loaded_version(last, m, opt) == 2


def test_damaged_checkpoints_are_one_line_errors(tmp_path, model):
    m, opt = model
    last = tmp_path / "last"
    _save(last, m, opt, 1)
    weights = last / "adapter_model.safetensors"
    data = weights.read_bytes()

    # truncated: incomplete by size, nothing is resumable from it
    weights.write_bytes(data[: len(data) // 2])
    assert ck.find_checkpoint(last) is None
    assert "truncated" in ck.describe_missing(last)
    # forged, same size: the hash check refuses it
    forged = bytearray(data)
    forged[-4:] = b"\x00\x00\xc0\x7f"  # a NaN in the last float
    weights.write_bytes(bytes(forged))
    with pytest.raises(ck.CheckpointError, match="SHA-256"):
        ck.load_training_checkpoint(last, m, opt)
    # a forged header (with a manifest to match): not a readable safetensors file
    weights.write_bytes(b"\xff" * 8 + b"{not json" + b" " * (len(data) - 17))
    with pytest.raises(ck.CheckpointError, match="safetensors"):
        ck.load_training_checkpoint(last, m, opt, verify=False)
    weights.write_bytes(data)
    # missing rng.safetensors
    (last / "rng.safetensors").unlink()
    assert ck.find_checkpoint(last) is None
    assert "rng.safetensors: missing" in ck.describe_missing(last)
    with pytest.raises(ck.CheckpointError, match="rng.safetensors"):
        ck.load_training_checkpoint(last, m, opt)


def test_full_disk_is_one_line_and_leaves_no_temp(tmp_path, model, monkeypatch):
    import errno

    from xmodal.atomic import WriteError

    m, opt = model
    last = tmp_path / "last"
    _save(last, m, opt, 1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_safetensors", full)
    with pytest.raises(WriteError, match="no space left on device"):
        _save(last, m, opt, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert _loaded_version(last, m, opt) == 1


def test_refuses_to_write_non_finite_weights(tmp_path, model):
    m, opt = model
    last = tmp_path / "last"
    _save(last, m, opt, 1)
    with torch.no_grad():
        next(iter(m.trainable_parameters())).fill_(float("nan"))
    with pytest.raises(ck.CheckpointError, match="non-finite"):
        ck.save_training_checkpoint(last, m, opt, {"version": 2}, [ck.capture_rng()])
    assert _loaded_version(last, m, opt) == 1
