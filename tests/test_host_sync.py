"""No host synchronisation inside a training step: device values are read once per log interval.

On a GPU every `.item()`, `float(t)`, `.tolist()`, `.cpu()`, `.numpy()` or `if t:` of a device
tensor waits for the device. On CPU there is nothing to wait for, so the test counts the calls
themselves: none inside `Trainer.step`, exactly one transfer in `Trainer.collect`.
"""

import contextlib
from collections import Counter

import pytest
import torch

from xmodal.engine.config import TrainConfig
from xmodal.engine.heads import SimilarityHead
from xmodal.engine.train import Trainer
from xmodal.methods import apply_method, make_config

SYNCING = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


@contextlib.contextmanager
def count_host_reads():
    counts = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def wrap(name, fn):
        def counted(self, *a, **k):
            counts[name] += 1
            return fn(self, *a, **k)
        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _batch(model, seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    captions = [f"caption number {i}" for i in range(n)]
    return {"tokens": model.tokenize(captions), "pixels": torch.randn(n, 2, 3, 32, 32, generator=g),
            "frame_mask": torch.ones(n, 2, dtype=torch.bool), "captions": captions}


@pytest.mark.parametrize("precision,grad_accum,clip", [("fp32", 1, 1.0), ("fp32", 2, 0.0), ("fp16", 1, 1.0)])
def test_step_reads_nothing_back_and_collect_once(tiny_backbone, precision, grad_accum, clip):
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter", init="normal"))
    cfg = TrainConfig(lr=1e-3, precision=precision, grad_clip=clip, grad_accum=grad_accum)
    trainer = Trainer(model, SimilarityHead(), cfg, total_steps=10)
    batches = [[_batch(model, 10 * s + i) for i in range(grad_accum)] for s in range(3)]
    trainer.step(batches[0])  # warm-up: lazy optimizer state, first-call caches
    trainer.collect()
    with count_host_reads() as counts:
        for micro in batches[1:]:
            trainer.step(micro)
    assert sum(counts.values()) == 0, dict(counts)
    with count_host_reads() as counts:
        records = trainer.collect()
    assert counts["tolist"] == 1 and sum(counts.values()) == 1, dict(counts)
    assert [r.step for r in records] == [2, 3] and all(r.loss > 0 and r.grad_norm > 0 for r in records)


def _ddp_step_worker(rank, world, port, out_dir):
    """Two gloo ranks run Trainer.step; rank 1's micro-batches lost a sample (unreadable media)."""
    import json
    import os

    import torch.distributed as dist

    from xmodal.backbones.factory import create_backbone

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = apply_method(create_backbone("xmodal-test", seed=0), make_config("cross_modal_adapter", init="normal"))
        cfg = TrainConfig(lr=1e-3, precision="fp32", grad_clip=1.0, batch_size=8, device="cpu")
        trainer = Trainer(model, SimilarityHead("text_conditioned"), cfg, total_steps=10, max_frames=2)
        rows = 4 if rank == 0 else 3
        batches = [[_batch(model, 10 * s + rank, n=rows)] for s in range(4)]
        trainer.step(batches[0])  # warm-up
        trainer.collect()
        with count_host_reads() as padded:
            for micro in batches[1:3]:
                trainer.step(micro)
        records = trainer.collect()
        bound = trainer.pad_to
        trainer.pad_to = None  # control: the size exchange this replaced reads back to the host
        with count_host_reads() as exchanged:
            trainer.step(batches[3])
        trainer.collect()
        with open(os.path.join(out_dir, f"r{rank}.json"), "w") as f:
            json.dump({"padded": dict(padded), "exchanged": dict(exchanged), "pad_to": list(bound),
                       "losses": [r.loss for r in records]}, f)
    finally:
        dist.destroy_process_group()


def test_ddp_step_reads_nothing_back(tmp_path):
    """With several processes the loss gathers at a fixed padded shape: no `.tolist()` (or any
    other host read) inside `Trainer.step`, even with uneven batch sizes across ranks."""
    import json
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_step_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        got = json.loads((tmp_path / f"r{r}.json").read_text())
        assert got["pad_to"] == [4, 2]
        assert sum(got["padded"].values()) == 0, got["padded"]
        assert got["exchanged"].get("tolist", 0) >= 1, got["exchanged"]
        assert all(loss > 0 for loss in got["losses"])
