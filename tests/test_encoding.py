"""Batched no-grad encoding on the tiny `xmodal-test` backbone (32 px, embed dim 32)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from xmodal.encoding import (
    encode_images,
    encode_loader,
    encode_texts,
    encode_videos,
    eval_mode,
    normalize,
)
from xmodal.errors import XModalError
from xmodal.methods.model import AdaptedModel

TEXTS = [
    "a man is playing a guitar on stage",
    "two dogs run across a snowy field",
    "someone slices onions in a kitchen",
    "a red car drives down the highway at night",
    "children are swimming in a pool",
]


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- texts
def test_texts_batched_equals_unbatched_and_direct(tiny_backbone):
    one_batch = encode_texts(tiny_backbone, TEXTS, batch_size=256)
    small = encode_texts(tiny_backbone, TEXTS, batch_size=2)
    direct = tiny_backbone.encode_text(tiny_backbone.tokenize(TEXTS))
    assert one_batch.shape == (5, 32) and one_batch.dtype == torch.float32
    assert not one_batch.requires_grad
    close(small, one_batch)
    close(one_batch, direct.detach())
    assert not torch.allclose(one_batch[0], one_batch[1])  # different captions, different features


def test_long_texts_keep_end_token_through_encoding(tiny_backbone):
    long = "one two three four five six seven eight nine ten"
    # budget 6 = SOT + 4 words + EOT: the cut caption must encode exactly like "one two three four",
    # which only happens if the EOT (where CLIP pools) survives the cut
    cut = encode_texts(tiny_backbone, [long], max_words=6)
    short = encode_texts(tiny_backbone, ["one two three four"])
    full = encode_texts(tiny_backbone, [long])
    close(cut, short)
    assert not torch.allclose(cut, full, atol=1e-4)


def test_empty_and_invalid_texts(tiny_backbone):
    empty = encode_texts(tiny_backbone, [])
    assert empty.shape == (0, 32) and empty.dtype == torch.float32
    with pytest.raises(XModalError, match=r"texts\[1\]: expected a string"):
        encode_texts(tiny_backbone, ["fine", 3])
    with pytest.raises(XModalError, match="batch_size"):
        encode_texts(tiny_backbone, TEXTS, batch_size=0)


def test_adapted_model_without_method_matches_backbone(tiny_backbone):
    wrapped = AdaptedModel(tiny_backbone)
    close(encode_texts(wrapped, TEXTS[:3]), encode_texts(tiny_backbone, TEXTS[:3]))
    x = images(3)
    close(encode_images(wrapped, x), encode_images(tiny_backbone, x))


# ------------------------------------------------------------------------ images
def test_images_tensor_iterable_and_dicts_agree(tiny_backbone):
    x = images(7)
    direct = tiny_backbone.encode_image(x).detach()
    from_tensor = encode_images(tiny_backbone, x, batch_size=3)
    from_batches = encode_images(tiny_backbone, [x[:4], x[4:]])
    from_dicts = encode_images(tiny_backbone, ({"pixels": b.unsqueeze(1)} for b in (x[:2], x[2:])))
    assert from_tensor.shape == (7, 32)
    for got in (from_tensor, from_batches, from_dicts):
        close(got, direct)
    assert encode_images(tiny_backbone, x[:0]).shape == (0, 32)
    with pytest.raises(XModalError, match=r"images batch 0: expected images of shape \(N, 3, H, W\)"):
        encode_images(tiny_backbone, [torch.zeros(3, 32, 32)])
    with pytest.raises(XModalError, match="no 'pixels' entry"):
        encode_images(tiny_backbone, [{"frames": x}])


# ------------------------------------------------------------------------ videos
def test_video_frames_encode_like_independent_images(tiny_backbone):
    clips = torch.randn(3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    feats = encode_videos(tiny_backbone, clips, batch_size=2)
    assert feats.shape == (3, 4, 32) and feats.dtype == torch.float32
    per_frame = tiny_backbone.encode_image(clips.flatten(0, 1)).detach().view(3, 4, 32)
    close(feats, per_frame)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    close(encode_videos(tiny_backbone, clips, mask, batch_size=3), feats)


def test_video_input_errors(tiny_backbone):
    with pytest.raises(XModalError, match=r"videos: expected clips of shape \(B, F, 3, H, W\)"):
        encode_videos(tiny_backbone, images(2))
    with pytest.raises(XModalError, match=r"frame_mask must have shape \(B, F\) = \(2, 3\)"):
        encode_videos(tiny_backbone, torch.zeros(2, 3, 3, 32, 32), torch.ones(2, 4, dtype=torch.bool))


class _Clips(Dataset):
    """Clips of 3 frames whose last `pad[i]` frames are padding."""

    def __init__(self, n: int, frames: int = 3):
        self.pixels = torch.randn(n, frames, 3, 32, 32, generator=torch.Generator().manual_seed(2))
        self.pad = [i % frames for i in range(n)]

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i):
        mask = torch.ones(self.pixels.shape[1], dtype=torch.bool)
        if self.pad[i]:
            mask[-self.pad[i] :] = False
        return {"pixels": self.pixels[i], "frame_mask": mask, "index": i}


def test_encode_loader_with_dataloader(tiny_backbone):
    data = _Clips(5)
    feats, mask, index = encode_loader(tiny_backbone, DataLoader(data, batch_size=2), return_index=True)
    assert feats.shape == (5, 3, 32) and mask.shape == (5, 3) and mask.dtype == torch.bool
    assert index.tolist() == [0, 1, 2, 3, 4]
    assert mask.sum(dim=1).tolist() == [3, 2, 1, 3, 2]
    close(feats, encode_videos(tiny_backbone, data.pixels))


def test_encode_loader_pads_frames_across_batches(tiny_backbone):
    a = torch.randn(2, 4, 3, 32, 32)
    b = torch.randn(3, 2, 3, 32, 32)
    b_mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    batches = [{"pixels": a}, {"pixels": b, "frame_mask": b_mask}, {"pixels": images(1)}]  # last: 4-D images
    feats, mask = encode_loader(tiny_backbone, batches)
    assert feats.shape == (6, 4, 32) and mask.shape == (6, 4)
    assert mask[:2].all()
    assert mask[2:5, :2].tolist() == b_mask.tolist() and not mask[2:, 2:].any() and not mask[5, 1:].any()
    assert (feats[2:, 2:] == 0).all() and (feats[5, 1:] == 0).all()
    close(feats[:2], encode_videos(tiny_backbone, a))
    close(feats[2:5, :2], encode_videos(tiny_backbone, b))
    close(feats[5, 0], encode_images(tiny_backbone, images(1))[0])


def test_encode_loader_errors(tiny_backbone):
    with pytest.raises(XModalError, match="yielded no batches"):
        encode_loader(tiny_backbone, [])
    with pytest.raises(XModalError, match=r"loader batch 1: expected a dict with 'pixels'"):
        encode_loader(tiny_backbone, [{"pixels": torch.zeros(1, 1, 3, 32, 32)}, {"tokens": 1}])
    with pytest.raises(XModalError, match="return_index=True needs an 'index'"):
        encode_loader(tiny_backbone, [{"pixels": torch.zeros(1, 1, 3, 32, 32)}], return_index=True)


# ------------------------------------------------------------ modes, grad, amp
def test_model_mode_restored_and_eval_inside(tiny_backbone):
    seen = []
    hook = tiny_backbone.visual.register_forward_hook(lambda m, a, o: seen.append(m.training))
    tiny_backbone.train()
    tiny_backbone.clip.transformer.eval()  # a mixed state must come back exactly
    before = {name: m.training for name, m in tiny_backbone.named_modules()}
    encode_images(tiny_backbone, images(2))
    encode_videos(tiny_backbone, torch.zeros(1, 2, 3, 32, 32))
    encode_texts(tiny_backbone, TEXTS[:2])
    hook.remove()
    assert seen == [False, False]  # the vision tower ran in eval mode
    assert {name: m.training for name, m in tiny_backbone.named_modules()} == before
    assert tiny_backbone.training and not tiny_backbone.clip.transformer.training


def test_eval_mode_restores_after_error(tiny_backbone):
    tiny_backbone.train()
    with pytest.raises(RuntimeError):
        with eval_mode(tiny_backbone):
            assert not tiny_backbone.visual.training
            raise RuntimeError("boom")
    assert all(m.training for m in tiny_backbone.modules())


def test_no_grad_even_with_trainable_parameters(tiny_backbone):
    tiny_backbone.requires_grad_(True)
    assert not encode_texts(tiny_backbone, TEXTS[:2]).requires_grad
    assert not encode_videos(tiny_backbone, torch.zeros(1, 2, 3, 32, 32)).requires_grad


def test_autocast_outputs_float32(tiny_backbone):
    x = images(4)
    ref = encode_images(tiny_backbone, x)
    amp = encode_images(tiny_backbone, x, amp=True)  # bf16 autocast, forced on CPU
    assert amp.dtype == torch.float32
    assert not torch.equal(amp, ref)  # it really ran in reduced precision
    assert torch.nn.functional.cosine_similarity(amp, ref).min() > 0.98
    text = encode_texts(tiny_backbone, TEXTS[:2], amp=True)
    assert text.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(text, encode_texts(tiny_backbone, TEXTS[:2])).min() > 0.98


def test_bf16_backbone_gets_cast_inputs_and_float32_outputs(tiny_backbone_factory):
    from xmodal.backbones.factory import create_backbone

    model = create_backbone("xmodal-test", seed=0, precision="bf16")
    ref = encode_videos(tiny_backbone_factory(0), torch.ones(1, 2, 3, 32, 32) * 0.5)
    out = encode_videos(model, torch.ones(1, 2, 3, 32, 32) * 0.5)  # float32 pixels into a bf16 model
    assert out.dtype == torch.float32 and out.shape == (1, 2, 32)
    assert torch.nn.functional.cosine_similarity(out[0], ref[0]).min() > 0.95


def test_progress_flag(tiny_backbone, capsys):
    encode_texts(tiny_backbone, TEXTS, batch_size=2, progress=True)
    assert "texts" in capsys.readouterr().err
    encode_texts(tiny_backbone, TEXTS, batch_size=2, progress=False)
    assert capsys.readouterr().err == ""


def test_normalize():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    y = normalize(x)
    close(y, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))
    frames = torch.randn(2, 3, 8)
    assert torch.allclose(normalize(frames).norm(dim=-1), torch.ones(2, 3))


# ------------------------------------------------------- inference mode, transfers
def test_encoding_runs_in_inference_mode_and_returns_ordinary_tensors(tiny_backbone):
    seen = []
    hook = tiny_backbone.visual.register_forward_hook(lambda m, a, o: seen.append(torch.is_inference_mode_enabled()))
    clips = torch.randn(2, 2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    outs = [encode_videos(tiny_backbone, clips), encode_images(tiny_backbone, images(2)),
            encode_texts(tiny_backbone, TEXTS[:2]), encode_loader(tiny_backbone, [{"pixels": clips}])[0]]
    hook.remove()
    assert seen and all(seen)  # no autograd bookkeeping at all while encoding
    for out in outs:
        assert not out.is_inference()
        out.add_(1.0)  # usable in place / with autograd afterwards (an inference tensor would raise)


def test_cpu_results_bit_identical_to_direct_eval_forward(tiny_backbone):
    clips = torch.randn(5, 3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    tiny_backbone.eval()
    with torch.no_grad():
        direct_v = tiny_backbone.encode_video(clips)
        direct_t = tiny_backbone.encode_text(tiny_backbone.tokenize(TEXTS))
    assert torch.equal(encode_videos(tiny_backbone, clips, batch_size=5), direct_v)
    assert torch.equal(encode_texts(tiny_backbone, TEXTS), direct_t)
    feats, _ = encode_loader(tiny_backbone, [{"pixels": clips}])
    assert torch.equal(feats, direct_v)


def test_to_device_on_cpu_is_a_plain_cast():
    from xmodal.encoding import to_device

    x = torch.randn(3, 4)
    assert to_device(x, torch.device("cpu")) is x
    y = to_device(x, torch.device("cpu"), torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, x.to(torch.bfloat16))


def test_loader_options_pin_on_cuda_and_prefetch_with_workers():
    from xmodal.encoding import loader_options

    assert loader_options("cpu") == {"pin_memory": False}
    assert loader_options("cuda", num_workers=4) == {"pin_memory": True, "prefetch_factor": 4}
    # they are valid DataLoader arguments
    DataLoader(_Clips(2), batch_size=1, num_workers=0, **loader_options("cpu"))
