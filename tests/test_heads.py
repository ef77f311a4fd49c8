import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from xmodal.engine import heads
from xmodal.engine.heads import SimilarityHead, mean_pool, text_chunk_size, text_conditioned_similarity
from xmodal.errors import XModalError


def _reference_text_conditioned(text, frames, mask, tau, normalize):
    """Per-pair loops over the paper's formula (T x V x F x D in effect)."""
    t_n, v_n = text.shape[0], frames.shape[0]
    out = torch.empty(t_n, v_n, dtype=torch.float64)
    for i in range(t_n):
        for j in range(v_n):
            t = text[i].double()
            f = frames[j].double()
            keep = mask[j]
            if normalize:
                t, f = F.normalize(t, dim=-1), F.normalize(f, dim=-1)
            f = f[keep]
            alpha = torch.softmax(f @ t / tau, dim=0)
            pooled = (alpha[:, None] * f).sum(0)
            out[i, j] = F.cosine_similarity(pooled, t, dim=0)
    return out


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(7, 16, generator=g) * 3
    frames = torch.randn(5, 4, 16, generator=g) * 3
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 3] = False
    mask[3, 1:] = False
    return text, frames, mask


@pytest.mark.parametrize("normalize,tau", [(False, 5.0), (True, 0.05)])
def test_text_conditioned_matches_formula(feats, normalize, tau):
    text, frames, mask = feats
    got = text_conditioned_similarity(text, frames, mask, tau, normalize)
    ref = _reference_text_conditioned(text, frames, mask, tau, normalize)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_chunked_equals_unchunked_and_caps_memory(feats):
    text, frames, mask = feats
    full = text_conditioned_similarity(text, frames, mask, max_bytes=None)
    cap = 2 * 5 * (2 * 4 + 2 * 16) * 4  # room for two texts per chunk
    assert text_chunk_size(5, 4, 16, cap) == 2
    sizes = []
    real_bmm = torch.bmm

    def spy(a, b):
        out = real_bmm(a, b)
        sizes.append(out.numel())
        return out

    with mock.patch.object(heads.torch, "bmm", side_effect=spy):
        chunked = text_conditioned_similarity(text, frames, mask, max_bytes=cap)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-6)
    assert len(sizes) == math.ceil(7 / 2)
    assert max(sizes) <= 2 * 5 * 16  # never more than (T_chunk, V, D) pooled values at once


def test_masked_frames_do_not_matter(feats):
    text, frames, mask = feats
    head = SimilarityHead("text_conditioned")
    a = head(text, frames, mask)
    changed = frames.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 16) * 100
    torch.testing.assert_close(head(text, changed, mask), a)
    mean = SimilarityHead("mean")
    torch.testing.assert_close(mean(text, changed, mask), mean(text, frames, mask))
    # an unmasked frame does matter
    changed[0, 0] += 50
    assert not torch.allclose(head(text, changed, mask)[:, 0], a[:, 0])


def test_all_padding_clip_gives_finite_scores(feats):
    text, frames, mask = feats
    mask[2] = False
    for pooling in ("mean", "text_conditioned"):
        assert torch.isfinite(SimilarityHead(pooling)(text, frames, mask)).all()


def test_one_frame_is_clip_cosine(feats):
    text, frames, _ = feats
    images = frames[:, 0]
    expected = F.normalize(text, dim=-1) @ F.normalize(images, dim=-1).t()
    for pooling in ("mean", "text_conditioned"):
        head = SimilarityHead(pooling)
        torch.testing.assert_close(head(text, images), expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(head(text, images.unsqueeze(1)), expected, atol=1e-6, rtol=1e-6)


def test_mean_pooling_is_clip4clip_meanp(feats):
    text, frames, mask = feats
    fn = F.normalize(frames, dim=-1)
    pooled = torch.stack([fn[j][mask[j]].mean(0) for j in range(frames.shape[0])])
    expected = F.normalize(text, dim=-1) @ F.normalize(pooled, dim=-1).t()
    torch.testing.assert_close(SimilarityHead("mean")(text, frames, mask), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mean_pool(frames, mask), F.normalize(pooled, dim=-1))


def test_temperature_interpolates_between_mean_and_best_frame(feats):
    text, frames, mask = feats
    m = torch.ones_like(mask)
    flat = text_conditioned_similarity(text, frames, m, temperature=1e6)
    raw_mean = F.normalize(frames.mean(1), dim=-1)
    torch.testing.assert_close(flat, F.normalize(text, dim=-1) @ raw_mean.t(), atol=1e-4, rtol=1e-4)
    sharp = text_conditioned_similarity(text, frames, m, temperature=1e-4)
    best = frames[torch.arange(5)[None, :], (torch.einsum("td,vfd->tvf", text, frames)).argmax(-1)]  # (T,V,D)
    expected = F.cosine_similarity(best, text[:, None, :], dim=-1)
    torch.testing.assert_close(sharp, expected, atol=1e-4, rtol=1e-4)


def test_compact_visual_preserves_scores(feats):
    text, frames, mask = feats
    for pooling in ("mean", "text_conditioned"):
        head = SimilarityHead(pooling)
        f2, m2 = head.compact_visual(frames, mask)
        torch.testing.assert_close(head(text, f2, m2), head(text, frames, mask), atol=1e-6, rtol=1e-6)
    assert SimilarityHead("mean").compact_visual(frames, mask)[0].shape == (5, 1, 16)


def test_invalid_head_settings():
    with pytest.raises(XModalError, match="pooling"):
        SimilarityHead("max")
    with pytest.raises(XModalError, match="temperature"):
        SimilarityHead("text_conditioned", temperature=0)


def test_gradients_flow_through_head(feats):
    text, frames, mask = feats
    text = text.clone().requires_grad_(True)
    frames = frames.clone().requires_grad_(True)
    SimilarityHead()(text, frames, mask, max_bytes=None).sum().backward()
    assert text.grad.abs().sum() > 0 and frames.grad.abs().sum() > 0
    assert (frames.grad[~mask] == 0).all()
