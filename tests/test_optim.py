import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from xmodal.backbones import context
from xmodal.engine.checkpoint import flatten_optimizer, unflatten_optimizer
from xmodal.engine.config import TrainConfig
from xmodal.engine.heads import SimilarityHead
from xmodal.engine.optim import (
    WarmupCosine, build_optimizer, checkpoint_blocks, clip_grad_norm, is_no_decay, param_groups, resolve_precision,
    scaler_state,
)
from xmodal.engine.train import Trainer
from xmodal.errors import XModalError
from xmodal.methods import apply_method, make_config


def _batch(model, n=4, frames=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    caps = [f"clip number {i} of a cat" for i in range(n)]
    mask = torch.ones(n, frames, dtype=torch.bool)
    mask[0, -1] = False
    return {"tokens": model.tokenize(caps, max_words=12), "pixels": torch.randn(n, frames, 3, 32, 32, generator=g),
            "frame_mask": mask}


def test_no_weight_decay_on_biases_norms_gains_and_logit_scale():
    cases = {
        "methods.default.vision.0.attn.down.weight": (torch.zeros(4, 8), False),
        "methods.default.vision.0.attn.down.bias": (torch.zeros(4), True),
        "backbone.clip.visual.transformer.resblocks.0.ln_1.weight": (torch.zeros(8), True),
        "backbone.clip.ln_final.weight": (torch.zeros(8), True),
        "backbone.clip.logit_scale": (torch.zeros(()), True),
        "backbone.clip.visual.proj": (torch.zeros(8, 4), False),
        "methods.default.gain": (torch.zeros(8), True),
        "methods.default.prompt_norm.weight": (torch.zeros(3, 3), True),
    }
    for name, (t, expected) in cases.items():
        assert is_no_decay(name, t) is expected, name
    params = [(n, nn.Parameter(t)) for n, (t, _) in cases.items()]
    groups = param_groups(params, 0.2)
    by = {g["group"]: g for g in groups}
    assert by["decay"]["weight_decay"] == 0.2 and by["no_decay"]["weight_decay"] == 0.0
    assert sorted(by["decay"]["param_names"]) == sorted(n for n, (_, nd) in cases.items() if not nd)
    frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    assert all(frozen is not p for g in param_groups([("x", frozen)], 0.2) for p in g["params"])
    with pytest.raises(XModalError, match="no trainable"):
        build_optimizer([("x", frozen)], 1e-3)


def test_warmup_then_cosine_and_state_roundtrip():
    p = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = WarmupCosine(opt, total_steps=20, warmup_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert sched.warmup_steps == 2
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))                 # monotone decay after warm-up
    assert lrs[11] == pytest.approx(0.5 * (1 + math.cos(math.pi * 9 / 18)))
    assert lrs[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 17 / 18)))
    # a new schedule loaded from JSON continues exactly
    opt2 = torch.optim.AdamW([nn.Parameter(torch.zeros(2, 2))], lr=1.0)
    state = json.loads(json.dumps(WarmupCosine(opt, 20, 0.1).state_dict()))
    fresh = WarmupCosine(opt2, 20, 0.1)
    fresh.load_state_dict({**state, "step_count": 7})
    assert opt2.param_groups[0]["lr"] == pytest.approx(lrs[7])
    with pytest.raises(XModalError):
        WarmupCosine(opt2, 0)


def test_optimizer_state_roundtrips_without_pickle(tiny_backbone):
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter", init="normal"))
    trainer = Trainer(model, SimilarityHead(), TrainConfig(lr=1e-3, precision="fp32"), total_steps=4)
    trainer.step([_batch(model)])
    tensors, meta = flatten_optimizer(trainer.optimizer)
    meta = json.loads(json.dumps(meta))  # JSON-able
    assert tensors and all(isinstance(v, torch.Tensor) for v in tensors.values())
    opt2 = build_optimizer(model.named_trainable_parameters(), 1e-3)
    unflatten_optimizer(opt2, tensors, meta)
    a, b = trainer.optimizer.state_dict(), opt2.state_dict()
    for idx in a["state"]:
        for k, v in a["state"][idx].items():
            torch.testing.assert_close(b["state"][idx][k], v)
    assert [g["lr"] for g in a["param_groups"]] == [g["lr"] for g in b["param_groups"]]
    assert tuple(b["param_groups"][0]["betas"]) == (0.9, 0.98)


def test_gradient_accumulation_averages_micro_batches(tiny_backbone_factory):
    cfg = TrainConfig(lr=1e-3, precision="fp32", grad_clip=0.0, grad_accum=2)
    model = apply_method(tiny_backbone_factory(0), make_config("cross_modal_adapter", init="normal"))
    b1, b2 = _batch(model, seed=1), _batch(model, seed=2)
    ref = apply_method(tiny_backbone_factory(0), make_config("cross_modal_adapter", init="normal"))
    ref.load_state_dict(model.state_dict())
    ref_trainer = Trainer(ref, SimilarityHead(), cfg, total_steps=4)
    losses = []
    for b in (b1, b2):
        loss, _ = ref_trainer.forward_loss(b)
        (loss / 2).backward()
        losses.append(float(loss.detach()))
    expected = {n: p.grad.clone() for n, p in ref.named_trainable_parameters()}

    trainer = Trainer(model, SimilarityHead(), cfg, total_steps=4)
    seen = {}
    real_step = trainer.optimizer.step

    def capture(*a, **k):
        seen.update({n: p.grad.clone() for n, p in model.named_trainable_parameters()})
        return real_step(*a, **k)

    trainer.optimizer.step = capture
    result = trainer.step([b1, b2])
    assert result.loss == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert result.samples == 8
    for n, g in expected.items():
        torch.testing.assert_close(seen[n], g, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.trainable_parameters())  # zeroed after the update


def test_grad_clipping_reports_pre_clip_norm():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_grad_norm([p], 1.0) == pytest.approx(5.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert clip_grad_norm([p], 0.0) == pytest.approx(5.0) and float(p.grad.norm()) == pytest.approx(5.0)


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    t, f = model(batch["tokens"], batch["pixels"], batch["frame_mask"])
    SimilarityHead()(t, f, batch["frame_mask"], max_bytes=None).logsumexp(1).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_trainable_parameters()}


@pytest.mark.parametrize("method", ["cross_modal_adapter", "st_adapter"])
def test_block_recomputation_gives_same_gradients(tiny_backbone_factory, method):
    """Hooks fire inside the recomputed blocks, and temporal methods still see F frames."""
    kw = {"init": "normal"} if method == "cross_modal_adapter" else {}
    model = apply_method(tiny_backbone_factory(0), make_config(method, **kw))
    with torch.no_grad():  # make every trainable tensor matter (zero-initialised ups included)
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = _batch(model)
    plain = _grads(model, batch)
    blocks = [b for m in ("vision", "text") for b in model.backbone.blocks(m)]
    frames_seen = []
    handle = blocks[0].ls_1.register_forward_hook(lambda *a: frames_seen.append(context.num_frames()))
    undo = checkpoint_blocks(blocks)
    try:
        recomputed = _grads(model, batch)
    finally:
        undo()
        handle.remove()
    assert frames_seen == [3, 3]  # forward and recomputation in backward, both with the clip's F
    assert all("forward" not in vars(b) for b in blocks)
    for n, g in plain.items():
        torch.testing.assert_close(recomputed[n], g, atol=1e-6, rtol=1e-5)


def test_precision_resolution_and_fp16_scaler(tiny_backbone):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(XModalError, match="precision"):
        resolve_precision("fp8", cpu)
    model = apply_method(tiny_backbone, make_config("cross_modal_adapter", init="normal"))
    trainer = Trainer(model, SimilarityHead(), TrainConfig(lr=1e-3, precision="fp16"), total_steps=2)
    assert trainer.scaler is not None
    r = trainer.step([_batch(model)])
    assert math.isfinite(r.loss)
    state = json.loads(json.dumps(scaler_state(trainer.scaler)))
    assert state["scale"] > 0
    bf = Trainer(model, SimilarityHead(), TrainConfig(lr=1e-3, precision="bf16"), total_steps=2)
    assert bf.scaler is None and math.isfinite(bf.step([_batch(model)]).loss)


@pytest.mark.filterwarnings("ignore:Full backward hook")
@pytest.mark.parametrize("grad_checkpoint", [False, True])
def test_no_backward_below_the_lowest_trainable_block(tiny_backbone_factory, grad_checkpoint):
    """MSTA adapts only the top block(s): backward must stop there, whatever lies below is
    never differentiated (hooks on the lower blocks never see a gradient)."""
    model = apply_method(tiny_backbone_factory(0), make_config("msta"))  # start="auto": top 5/12
    sites = {m: [i for i, b in enumerate(model.backbone.blocks(m))
                 if any(h for h in (b._forward_hooks, b._forward_pre_hooks))
                 or any(sub._forward_hooks or sub._forward_pre_hooks for sub in b.modules())]
             for m in ("vision", "text")}
    lowest = {m: min(s) for m, s in sites.items() if s}
    assert lowest and all(i > 0 for i in lowest.values()), sites  # something lies below to check
    seen = []
    handles = []
    for m in ("vision", "text"):
        for i, block in enumerate(model.backbone.blocks(m)):
            handles.append(block.register_full_backward_hook(lambda *a, m=m, i=i: seen.append((m, i))))
    trainer = Trainer(model, SimilarityHead("mean"),
                      TrainConfig(lr=1e-3, precision="fp32", grad_checkpoint_frozen=grad_checkpoint), total_steps=2)
    try:
        trainer.step([_batch(model)])
    finally:
        trainer.close()
        for h in handles:
            h.remove()
    below = [(m, i) for m, i in seen if m in lowest and i < lowest[m]]
    assert not below, f"backward reached blocks below the lowest trainable site {lowest}: {sorted(set(below))}"
    assert any(m in lowest and i >= lowest[m] for m, i in seen)  # the adapted blocks were differentiated


def _run_counted(model, batch, scope):
    """One forward+backward: how often each block ran, bytes the forward stored for backward, the gradients."""
    blocks = [(m, i, b) for m in ("vision", "text") for i, b in enumerate(model.backbone.blocks(m))]
    runs = {}

    def counting(key, forward):  # an instance attribute, not a hook: hooks would mark the block adapted
        def run(*a, **k):
            runs[key] = runs.get(key, 0) + 1
            return forward(*a, **k)
        return run

    for m, i, b in blocks:  # the MLP runs once per (re)computation of its block
        b.mlp.forward = counting((m, i), b.mlp.forward)
    handles = [SimpleNamespace(remove=lambda b=b: b.mlp.__dict__.pop("forward")) for _, _, b in blocks]
    undo = checkpoint_blocks([b for _, _, b in blocks], scope=scope) if scope else (lambda: None)
    stored = [0]

    def pack(t):
        stored[0] += t.numel() * t.element_size()
        return t

    try:
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # kept for backward by the forward
            t, f = model(batch["tokens"], batch["pixels"], batch["frame_mask"])
            loss = SimilarityHead()(t, f, batch["frame_mask"], max_bytes=None).logsumexp(1).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_trainable_parameters()}
    finally:
        undo()
        for h in handles:
            h.remove()
    return runs, stored[0], grads


@pytest.mark.parametrize("method,kw", [("cross_modal_adapter", {"init": "normal"}), ("msta", {}), ("coop", {}),
                                       ("lora", {})])
def test_selective_recompute_only_reruns_frozen_blocks(tiny_backbone_factory, method, kw):
    from xmodal.engine.optim import has_trainable_site

    model = apply_method(tiny_backbone_factory(0), make_config(method, **kw))
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    batch = _batch(model)
    adapted = {(m, i) for m in ("vision", "text") for i, b in enumerate(model.backbone.blocks(m))
               if has_trainable_site(b)}
    plain_runs, plain_bytes, plain = _run_counted(model, batch, None)
    all_runs, _, g_all = _run_counted(model, batch, "all")
    sel_runs, sel_bytes, g_sel = _run_counted(model, batch, "frozen")
    assert set(plain_runs.values()) == {1}
    for key, n in sel_runs.items():
        if key in adapted:
            assert n == 1, key        # adapted blocks keep their activations: never recomputed
        else:
            assert n == all_runs[key], key  # frozen blocks are recomputed exactly when "all" does it
    # recompute work: the selective scope reruns at most what "all" reruns, and stores at most what
    # no recomputation stores
    assert sum(sel_runs.values()) <= sum(all_runs.values())
    assert sel_bytes <= plain_bytes
    if any(all_runs[k] == 2 for k in adapted):
        assert sum(sel_runs.values()) < sum(all_runs.values())
    if any(n == 2 for k, n in sel_runs.items()):
        assert sel_bytes < plain_bytes
    if method == "coop":  # prompts enter below block 0: every text block is frozen yet differentiated
        assert all(sel_runs[("text", i)] == 2 for i in range(2)) and sel_bytes < plain_bytes
    for n, g in plain.items():
        torch.testing.assert_close(g_sel[n], g, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(g_all[n], g, atol=1e-6, rtol=1e-5)
