"""CLIP4Clip's seqTransf head: structure and init from the text transformer, masking, residual,
trained with the adapter and saved in (and restored from) the adapter checkpoint."""

import pytest
import torch
import torch.nn.functional as F

from xmodal.engine.heads import POOLINGS, SeqTransformer, SimilarityHead, mean_pool
from xmodal.errors import XModalError
from xmodal.methods import AdaptedModel, apply_method, make_config


def test_structure_and_clip4clip_init(tiny_backbone_factory):
    backbone = tiny_backbone_factory(0, "xmodal-tiny")  # embed dim 256 == text width: CLIP4Clip's init applies
    module = SimilarityHead("seq_transformer").build(backbone)
    assert len(module.resblocks) == 4 and module.heads == 256 // 64
    assert module.initialised_from == "text transformer"
    text = backbone.text_tower
    for mine, theirs in zip(module.resblocks, text.transformer.resblocks):
        for (k, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), k
    assert torch.equal(module.frame_position_embeddings.weight, text.positional_embedding)
    tiny = SimilarityHead("seq_transformer").build(tiny_backbone_factory(0))  # embed 32 != text width 48
    assert tiny.initialised_from == "random" and tiny.heads == 1
    assert "seq_transformer" in POOLINGS


def test_residual_mean_pool_and_padding():
    torch.manual_seed(0)
    module = SeqTransformer(32, layers=4)
    frames = torch.randn(3, 5, 32)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True] + [False] * 4])
    head = SimilarityHead("seq_transformer", module=module)
    text = torch.randn(4, 32)
    with torch.no_grad():
        out = module(frames, mask)
        for blk in module.resblocks:  # zero residual branches: output = 2 x input (transformer + residual)
            for p in blk.parameters():
                p.zero_()
        module.frame_position_embeddings.weight.zero_()
        assert torch.allclose(module(frames, mask), 2 * frames)
    edited = frames.clone()
    edited[1, 3:] = torch.randn(2, 32)
    torch.manual_seed(0)
    module2 = SeqTransformer(32, layers=4)
    head2 = SimilarityHead("seq_transformer", module=module2)
    with torch.no_grad():
        a, b = module2(frames, mask), module2(edited, mask)
        assert torch.allclose(a[1, :3], b[1, :3], atol=1e-5)  # padded frames do not leak
        assert torch.allclose(head2(text, frames, mask), head2(text, edited, mask), atol=1e-5)
        expected = F.normalize(text, dim=-1) @ mean_pool(module2(frames, mask), mask).t()
        assert torch.allclose(head2(text, frames, mask), expected, atol=1e-6)
    assert out.shape == frames.shape


def test_unbound_head_refuses():
    with pytest.raises(XModalError, match="use_head"):
        SimilarityHead("seq_transformer")(torch.randn(2, 8), torch.randn(2, 3, 8))


def test_trained_with_the_adapter_and_saved_with_it(tiny_backbone_factory, tmp_path):
    from xmodal.engine.config import TrainConfig
    from xmodal.engine.train import Trainer

    model = apply_method(tiny_backbone_factory(0), make_config("cross_modal_adapter"))
    adapter_only = len(model.trainable_parameters())
    head = model.use_head(SimilarityHead("seq_transformer"))
    assert head.module is model.head_module
    ids = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in ids for p in head.module.parameters())
    assert len(ids) == adapter_only + len(list(head.module.parameters()))
    before = {k: v.clone() for k, v in head.module.state_dict().items()}
    captions = ["the red circle moves left", "a blue square appears"]
    batch = {"tokens": model.tokenize(captions), "pixels": torch.randn(2, 3, 3, 32, 32),
             "frame_mask": torch.tensor([[True, True, True], [True, True, False]]), "captions": captions}
    trainer = Trainer(model, head, TrainConfig(lr=1e-2, device="cpu", precision="fp32", progress=False), 10)
    trainer.step([batch])
    after = head.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the head trained

    model.save_adapter(tmp_path / "ad")
    fresh = AdaptedModel(tiny_backbone_factory(0))
    fresh.load_adapter(tmp_path / "ad")
    assert fresh.head_module is not None and fresh.head_module.initialised_from == "checkpoint"
    head2 = fresh.use_head(SimilarityHead("seq_transformer"))
    assert head2.module is fresh.head_module  # the loaded weights, not a fresh build
    model.eval()
    fresh.eval()
    with torch.no_grad():
        t1, v1 = model(batch["tokens"], batch["pixels"], batch["frame_mask"])
        t2, v2 = fresh(batch["tokens"], batch["pixels"], batch["frame_mask"])
        assert torch.equal(head(t1, v1, batch["frame_mask"]), head2(t2, v2, batch["frame_mask"]))
    # resume path: the whole trainable state (method + head) loads back into the built model
    state = model.trainable_state()
    assert any(k.startswith("similarity_head.") for k in state)
    fresh.load_trainable_state(state, source="test")
