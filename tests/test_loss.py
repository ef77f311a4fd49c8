import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from tolerances import layout_tolerance

from xmodal.engine.heads import SimilarityHead
from xmodal.engine.loss import MAX_LOGIT_SCALE, contrastive_loss, logit_scale_value


def _batch(n=6, f=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(n, d, generator=g)
    frames = torch.randn(n, f, d, generator=g)
    mask = torch.ones(n, f, dtype=torch.bool)
    mask[1, 2] = False
    return text, frames, mask


@pytest.mark.parametrize("pooling", ["mean", "text_conditioned"])
def test_symmetric_cross_entropy(pooling):
    text, frames, mask = _batch()
    head = SimilarityHead(pooling)
    ls = torch.tensor(2.0)
    out = contrastive_loss(text, frames, mask, head, ls)
    s = head(text, frames, mask) * torch.exp(ls)
    n = s.shape[0]
    t2v = -torch.log_softmax(s, dim=1).diagonal().mean()
    v2t = -torch.log_softmax(s, dim=0).diagonal().mean()
    torch.testing.assert_close(out.loss, (t2v + v2t) / 2)
    torch.testing.assert_close(out.t2v, t2v)
    torch.testing.assert_close(out.v2t, v2t)
    assert out.logits_t2v.shape == (n, n)


def test_loss_is_permutation_invariant_and_rewards_alignment():
    text, frames, mask = _batch(n=8)
    head = SimilarityHead("text_conditioned")
    ls = torch.tensor(3.0)
    base = contrastive_loss(text, frames, mask, head, ls).loss
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    permuted = contrastive_loss(text[perm], frames[perm], mask[perm], head, ls).loss
    torch.testing.assert_close(base, permuted)
    aligned = contrastive_loss(frames.mean(1) * 5, frames * 5, None, head, ls).loss
    assert aligned < base


def test_logit_scale_capped_and_frozen():
    assert float(logit_scale_value(torch.tensor(10.0))) == pytest.approx(MAX_LOGIT_SCALE)
    text, frames, mask = _batch()
    text.requires_grad_(True)
    ls = torch.nn.Parameter(torch.tensor(2.0), requires_grad=False)
    contrastive_loss(text, frames, mask, SimilarityHead(), ls).loss.backward()
    assert text.grad is not None and text.grad.abs().sum() > 0
    assert ls.grad is None
    ls.requires_grad_(True)
    contrastive_loss(text, frames, mask, SimilarityHead(), ls).loss.backward()
    assert ls.grad is not None and ls.grad != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        text, frames, mask = _batch(n=8)
        n = 8 // world
        sl = slice(rank * n, (rank + 1) * n)
        for pooling in ("text_conditioned", "mean"):
            t = text[sl].clone().requires_grad_(True)
            f = frames[sl].clone().requires_grad_(True)
            out = contrastive_loss(t, f, mask[sl], SimilarityHead(pooling), torch.tensor(2.5))
            out.loss.backward()
            torch.save({"loss": out.loss.detach(), "gt": t.grad, "gf": f.grad},
                       os.path.join(out_dir, f"{pooling}_r{rank}.pt"))
        # uneven shares (samples dropped for unreadable media): 5 + 3
        sl = slice(0, 5) if rank == 0 else slice(5, 8)
        t = text[sl].clone().requires_grad_(True)
        f = frames[sl].clone().requires_grad_(True)
        out = contrastive_loss(t, f, mask[sl], SimilarityHead("text_conditioned"), torch.tensor(2.5))
        out.loss.backward()
        torch.save({"loss": out.loss.detach(), "gt": t.grad, "gf": f.grad}, os.path.join(out_dir, f"uneven_r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_negatives_match_single_process(tmp_path):
    mp.spawn(_loss_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for pooling in ("text_conditioned", "mean"):
        _compare_with_single(tmp_path, pooling)
    _compare_with_single(tmp_path, "text_conditioned", "uneven")


def _compare_with_single(tmp_path, pooling, tag=None):
    text, frames, mask = _batch(n=8)
    t = text.clone().requires_grad_(True)
    f = frames.clone().requires_grad_(True)
    full = contrastive_loss(t, f, mask, SimilarityHead(pooling), torch.tensor(2.5))
    full.loss.backward()
    parts = [torch.load(tmp_path / f"{tag or pooling}_r{r}.pt", weights_only=True) for r in range(2)]
    # tolerances from the reduction-order rounding (tests/tolerances.py): the loss averages
    # log-sum-exps over n logits of size <= the logit scale, each a d-term dot product; a
    # gradient element sums n rows of (softmax * feature) products
    n, d = text.shape
    scale = float(torch.tensor(2.5).exp())
    loss_tol = layout_tolerance(scale, n * d)
    # the global loss is the mean of the ranks' losses
    torch.testing.assert_close((parts[0]["loss"] + parts[1]["loss"]) / 2, full.loss.detach(), atol=loss_tol, rtol=0)
    # each rank's backward reaches its features through every rank's loss: grad = world * dL/dx,
    # which DDP's averaging over 2 ranks turns back into dL/dx exactly
    for got, want in ((torch.cat([p["gt"] for p in parts]) / 2, t.grad), (torch.cat([p["gf"] for p in parts]) / 2, f.grad)):
        torch.testing.assert_close(got, want, atol=layout_tolerance(float(want.abs().max()) * scale, n * d), rtol=0)


# ------------------------------------------------------------- fixed-shape (padded) gather
def _grads(text, frames, mask, head, pad_to=None):
    t = text.clone().requires_grad_(True)
    f = frames.clone().requires_grad_(True)
    ls = torch.tensor(2.5, requires_grad=True)
    out = contrastive_loss(t, f, mask, head, ls, pad_to=pad_to)
    out.loss.backward()
    return out, t.grad, f.grad, ls.grad


@pytest.mark.parametrize("pooling", ["mean", "text_conditioned"])
def test_padded_layout_equals_unpadded_in_one_process(pooling):
    """pad_to adds padding rows and frames (masked out) without changing the loss or gradients."""
    text, frames, mask = _batch(n=6, f=3)
    head = SimilarityHead(pooling)
    ref, gt, gf, gls = _grads(text, frames, mask, head)
    out, pt, pf, pls = _grads(text, frames, mask, head, pad_to=(9, 5))
    n = text.shape[0]
    assert out.logits_t2v.shape == (n, 9)
    assert torch.isneginf(out.logits_t2v[:, n:]).all()
    # same values: only a GEMM over more (padding) columns may block, hence round, differently
    scale, d = float(torch.tensor(2.5).exp()), text.shape[1]
    torch.testing.assert_close(out.logits_t2v[:, :n], ref.logits_t2v, atol=layout_tolerance(scale, d), rtol=0)
    for got, want in ((out.loss, ref.loss), (out.t2v, ref.t2v), (out.v2t, ref.v2t), (pt, gt), (pf, gf), (pls, gls)):
        got, want = got.detach(), want.detach()
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=layout_tolerance(float(want.abs().max()) * scale, n * d), rtol=0)


def test_padded_layout_refuses_more_than_the_bound():
    text, frames, mask = _batch(n=6, f=3)
    with pytest.raises(ValueError, match="more than the bound"):
        contrastive_loss(text, frames, mask, SimilarityHead(), torch.tensor(2.5), pad_to=(5, 3))
    with pytest.raises(ValueError, match="more than the bound"):
        contrastive_loss(text, frames, mask, SimilarityHead("text_conditioned"), torch.tensor(2.5), pad_to=(6, 2))
    # mean pooling ships one pooled vector per video: any frame bound fits
    contrastive_loss(text, frames, mask, SimilarityHead("mean"), torch.tensor(2.5), pad_to=(6, 1))


def _uneven_parts(rank):
    """Rank 0 holds 5 rows of 3 frames, rank 1 only 3 rows (a sample dropped) of 2 frames."""
    text, frames, mask = _batch(n=8)
    if rank == 0:
        return text[:5], frames[:5], mask[:5]
    return text[5:], frames[5:, :2], mask[5:, :2]


def _padded_loss_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    from xmodal.engine import distributed as dist_utils

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = []
    real = dist_utils.gather_ints
    dist_utils.gather_ints = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        for pooling in ("text_conditioned", "mean"):
            text, frames, mask = _uneven_parts(rank)
            out, gt, gf, gls = _grads(text, frames, mask, SimilarityHead(pooling), pad_to=(6, 4))
            torch.save({"loss": out.loss.detach(), "gt": gt, "gf": gf, "gls": gls, "gather_ints": len(calls)},
                       os.path.join(out_dir, f"padded_{pooling}_r{rank}.pt"))
    finally:
        dist_utils.gather_ints = real
        dist.destroy_process_group()


def test_padded_gather_with_uneven_ranks_matches_single_process(tmp_path):
    """Two ranks with different row and frame counts, gathered at a fixed padded shape, give the
    loss and gradients of one process on the concatenated real rows (no size exchange)."""
    mp.spawn(_padded_loss_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    text, frames, mask = _batch(n=8)
    frames, mask = frames.clone(), mask.clone()
    frames[5:, 2] = 0  # rank 1's clips have 2 frames: the single process sees them zero-padded
    mask[5:, 2] = False
    n, d = text.shape
    scale = float(torch.tensor(2.5).exp())
    for pooling in ("text_conditioned", "mean"):
        full, gt, gf, gls = _grads(text, frames, mask, SimilarityHead(pooling))
        parts = [torch.load(tmp_path / f"padded_{pooling}_r{r}.pt", weights_only=True) for r in range(2)]
        assert [p["gather_ints"] for p in parts] == [0, 0]
        torch.testing.assert_close((parts[0]["loss"] + parts[1]["loss"]) / 2, full.loss.detach(),
                                   atol=layout_tolerance(scale, n * d), rtol=0)
        # per-rank feature gradients are world * dL/dx (DDP's average restores dL/dx); the
        # logit scale's gradient is each rank's own, averaged by DDP
        got_t = torch.cat([parts[0]["gt"], parts[1]["gt"]]) / 2
        got_f = torch.cat([parts[0]["gf"], torch.nn.functional.pad(parts[1]["gf"], (0, 0, 0, 1))]) / 2
        got_ls = (parts[0]["gls"] + parts[1]["gls"]) / 2
        for got, want in ((got_t, gt), (got_f, gf), (got_ls, gls)):
            torch.testing.assert_close(got, want, atol=layout_tolerance(float(want.abs().max()) * scale, n * d), rtol=0)
