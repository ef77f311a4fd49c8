"""CoOp, VPT-deep, VL-Prompt, MaPLe: where the prompts go and what they couple."""

import pytest
import torch

from xmodal.methods import apply_method, make_config

VIDEO = torch.randn(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_coop_context_initialised_from_phrase_equals_writing_the_phrase(tiny_backbone_factory):
    """With ctx = embeddings of "a video of", CoOp's "cat" is the frozen model's "a video of cat"."""
    backbone = tiny_backbone_factory(0)
    with torch.no_grad():
        want = backbone.encode_text(backbone.tokenize(["a video of cat", "a video of two dogs"]))
    model = apply_method(backbone, make_config("coop", n_ctx=3, init_text="a video of"))
    tokens = model.tokenize(["cat", "two dogs"])
    with torch.no_grad():
        got = model.encode_text(tokens)
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        model.method.ctx.add_(torch.randn_like(model.method.ctx))  # (a constant shift would vanish in LayerNorm)
        assert not torch.allclose(model.encode_text(tokens), want, atol=1e-3)


def test_coop_max_words_budget_excludes_the_context(tiny_backbone_factory):
    model = apply_method(tiny_backbone_factory(0), make_config("coop", n_ctx=4))
    tokens = model.tokenize(["one two three four five six seven eight"], max_words=6)
    eot = model.backbone.tokenizer.eot_token_id
    assert int(tokens[0].argmax()) == 6 + 4 - 1 and tokens[0, 9].item() == eot


def test_vpt_inserts_tokens_and_prompts_change_the_output(tiny_backbone_factory):
    backbone = tiny_backbone_factory(0)
    with torch.no_grad():
        ref = backbone.encode_video(VIDEO)
    model = apply_method(backbone, make_config("vpt", n_tokens=5))
    lengths = []
    h = backbone.blocks("vision")[1].ls_1.register_forward_hook(lambda m, a, o: lengths.append(o.shape[1]))
    with torch.no_grad():
        out = model.encode_video(VIDEO)
    h.remove()
    assert lengths == [1 + 16 + 5]  # CLS + 4x4 patches + prompts
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    model.set_active(None)
    with torch.no_grad():
        assert torch.equal(backbone.encode_video(VIDEO), ref)  # detached: the frozen model again


@pytest.mark.parametrize("name,coupled", [("maple", True), ("vl_prompt", False)])
def test_vision_loss_reaches_text_prompts_only_when_coupled(tiny_backbone_factory, name, coupled):
    model = apply_method(tiny_backbone_factory(0), make_config(name))
    model.encode_video(VIDEO).pow(2).sum().backward()
    text_grads = [p.grad for p in model.method.text]
    assert all((g is not None and g.abs().sum() > 0) for g in text_grads) == coupled
    assert all(p.grad is None for p in model.backbone.parameters())
