"""The frozen-prefix cache (engine/prefix_cache.py): which blocks it covers, that a hit returns what
the blocks compute, that it steps aside where it could be wrong, and a training run with it."""

from __future__ import annotations

import json

import pytest
import torch

from xmodal.backbones.dual_encoder import TEXT, VISION
from xmodal.backbones.factory import create_backbone
from xmodal.engine.prefix_cache import FrozenPrefixCache, frozen_prefix_depth
from xmodal.methods import apply_method, config_from_dict


def _model(method: str, **opts):
    torch.manual_seed(0)
    backbone = create_backbone("xmodal-test", "random", seed=0)
    return apply_method(backbone, config_from_dict({"method": method, **opts})).train()  # as the Trainer sets it


def _inputs(model, n=3):
    g = torch.Generator().manual_seed(1)
    size = model.backbone.image_size
    pixels = torch.randn(n, 2, 3, size, size, generator=g)
    tokens = model.backbone.tokenize([f"caption number {i}" for i in range(n)], max_words=16)
    return tokens, pixels


@pytest.mark.parametrize("method,opts,expect", [
    ("projection", {}, lambda n: {VISION: n, TEXT: n}),
    ("partial", {"k": 1}, lambda n: {VISION: n - 1, TEXT: n - 1}),
    ("cross_modal_adapter", {}, lambda n: {VISION: 0, TEXT: 0}),  # adapters from the first block on
])
def test_depth_is_the_leading_blocks_without_a_trainable_site(method, opts, expect):
    model = _model(method, **opts)
    n = model.backbone.num_layers(VISION)
    cache = FrozenPrefixCache(model.backbone)
    assert cache.stats.depth == expect(n)
    assert cache.active == any(expect(n).values())
    assert frozen_prefix_depth(model.backbone.blocks(TEXT)) == expect(n)[TEXT]
    cache.close()


def test_msta_caches_the_blocks_below_its_first_adapted_one():
    model = _model("msta")
    first = {m: min(int(i) for i in model.method.layer_ids[m]) for m in model.method.layer_ids}
    cache = FrozenPrefixCache(model.backbone)
    assert cache.stats.depth == {VISION: first[VISION], TEXT: first[TEXT]} and cache.active
    cache.close()


def test_a_hit_returns_what_the_blocks_compute_and_gradients_match():
    model = _model("partial", k=1)
    tokens, pixels = _inputs(model)

    def step():
        model.zero_grad(set_to_none=True)
        text, frames = model(tokens, pixels)
        loss = (text.sum() + frames.square().sum())
        loss.backward()
        return text.detach(), frames.detach(), [p.grad.clone() for _, p in model.named_trainable_parameters()]

    reference = step()
    cache = FrozenPrefixCache(model.backbone)
    first = step()                      # all misses: computed and stored
    assert cache.stats.misses == 3 + 3 * 2 and cache.stats.hits == 0
    second = step()                     # all hits
    assert cache.stats.hits == 3 + 3 * 2 and cache.stats.misses == 3 + 3 * 2
    for got in (first, second):
        torch.testing.assert_close(got[0], reference[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[1], reference[1], rtol=0, atol=1e-6)
        for g, r in zip(got[2], reference[2]):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # another input is a miss, never a stale hit
    _, other = _inputs(model)
    other = other + 0.5
    with torch.enable_grad():
        model(tokens, other)
    assert cache.stats.misses == 3 + 3 * 2 + 3 * 2
    cache.close()
    assert "forward" not in vars(model.backbone.clip.visual.transformer)  # taken off again
    torch.testing.assert_close(step()[1], reference[1], rtol=0, atol=0)


def test_steps_aside_without_gradients_and_for_inputs_that_need_one():
    model = _model("projection")
    tokens, pixels = _inputs(model)
    cache = FrozenPrefixCache(model.backbone)
    model.eval()
    with torch.no_grad():  # evaluation: every item once, nothing stored
        model(tokens, pixels)
    assert cache.stats.hits == cache.stats.misses == 0 and cache.stats.bypassed == 2 and cache.stats.bytes == 0
    model.train()
    with torch.no_grad():  # a training-time pass without gradients (MSTA's frozen branch) is cached
        model(tokens, pixels)
    assert cache.stats.misses == 3 + 3 * 2 and cache.stats.bypassed == 2
    cache.close()

    coop = _model("coop")  # learned context tokens enter the text tower: its input needs a gradient
    cache = FrozenPrefixCache(coop.backbone)
    assert cache.stats.depth[TEXT] == coop.backbone.num_layers(TEXT)
    text, _ = coop(tokens, pixels)
    text.sum().backward()
    assert cache.stats.bypassed >= 1 and all(p.grad is not None for _, p in coop.named_trainable_parameters())
    cache.close()


def test_the_store_evicts_the_least_recently_used_within_its_cap():
    model = _model("projection")
    tokens, pixels = _inputs(model, n=4)
    probe = FrozenPrefixCache(model.backbone)
    model(tokens, pixels)
    per_call = probe.stats.bytes
    probe.close()
    cache = FrozenPrefixCache(model.backbone, max_bytes=per_call // 2)
    model(tokens, pixels)
    assert 0 < cache.stats.bytes <= per_call // 2 and cache.stats.evicted > 0
    cache.close()


def test_training_with_the_cache_matches_training_without(tmp_path):
    import yaml
    from test_train_engine import _config_file, make_own_data

    from xmodal.cli import main

    (tmp_path / "data").mkdir()
    data = make_own_data(tmp_path / "data")
    runs = {}
    for name, extra in (("plain", []), ("cached", ["--cache-frozen-prefix"])):
        (tmp_path / name).mkdir()
        cfg_path = _config_file(tmp_path / name, data)
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["method"] = {"name": "partial", "k": 1}
        cfg_path.write_text(yaml.safe_dump(cfg))
        assert main(["train", "--config", str(cfg_path), "--out", str(tmp_path / name / "run"), *extra]) == 0
        runs[name] = json.loads((tmp_path / name / "run" / "metrics.json").read_text())
    stats = runs["cached"]["frozen_prefix_cache"]
    assert stats["misses"] > 0 and stats["hits"] > 0 and stats["depth"][VISION] >= 1
    assert "frozen_prefix_cache" not in runs["plain"]
    for key in ("t2v/R@1", "v2t/R@1", "t2v/MnR"):
        assert runs["cached"][key] == pytest.approx(runs["plain"][key], abs=1e-6)


def test_a_sample_repeated_within_a_batch_is_computed_once():
    model = _model("projection")
    tokens, pixels = _inputs(model)
    pixels[:, 1] = pixels[:, 0]  # both frames of every clip are the same picture
    reference = model(tokens, pixels)[1].detach()
    cache = FrozenPrefixCache(model.backbone)
    rows = []  # installed after the cache measured its depth: a hook is a trainable site to it
    handle = model.backbone.blocks(VISION)[0].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    frames = model(tokens, pixels)[1].detach()
    handle.remove()
    assert rows == [3]  # the first block ran once, on the 3 distinct frames
    assert cache.stats.misses == 3 + 3 and cache.stats.hits == 0  # 3 captions, 3 distinct frames
    torch.testing.assert_close(frames, reference, rtol=0, atol=1e-6)
    cache.close()
