"""Fast paths of engine/fastpath.py on CPU: whole-tower compile with the adapter hooks traced in,
bf16-stored frozen weights (bit-identical under bf16 autocast), CUDA-graph step plumbing."""

from __future__ import annotations

import pytest
import torch

from xmodal.engine.config import TrainConfig
from xmodal.engine.fastpath import (
    CUDA_DEFAULTS, CudaGraphStep, FastPathOptions, make_device_step, prepare_fast_path,
)
from xmodal.engine.heads import SimilarityHead
from xmodal.engine.optim import checkpoint_blocks
from xmodal.engine.train import STEP_FIELDS, Trainer
from xmodal.errors import XModalError
from xmodal.methods import apply_method, fused, make_config


def _model(factory, method="cross_modal_adapter", seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"init": "normal", **kw} if method == "cross_modal_adapter" else kw
    model = apply_method(factory(seed), make_config(method, **kw))
    model.train()
    return model


def _inputs(model, b=2, f=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = model.tokenize(["a dog runs on the grass", "a cat sits"][:b] * (b // 2 + 1))[:b]
    return tokens, torch.randn(b, f, 3, 32, 32, generator=g)


# ------------------------------------------------------------------------ options
def test_options_from_config_take_device_defaults():
    cpu = FastPathOptions.from_config(TrainConfig(), torch.device("cpu"))
    assert not (cpu.compile or cpu.fused_adapters or cpu.bf16_frozen_weights or cpu.cuda_graphs)
    cuda = FastPathOptions.from_config(object(), torch.device("cuda"))
    assert cuda.compile == CUDA_DEFAULTS["compile"] and cuda.bf16_frozen_weights == CUDA_DEFAULTS["bf16_frozen_weights"]
    explicit = FastPathOptions.from_config(TrainConfig(compile=False), torch.device("cuda"))
    assert explicit.compile is False  # an explicit setting beats the default


# ------------------------------------------------------------------------ compile
def test_whole_tower_compile_traces_hooks_and_follows_detach(tiny_backbone_factory):
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    model = _model(tiny_backbone_factory)
    tokens, pixels = _inputs(model)
    ref_t, ref_v = model(tokens, pixels)
    with model.disable_adapters():
        frozen_t, frozen_v = model(tokens, pixels)
    assert not torch.allclose(ref_v, frozen_v, atol=1e-4)  # the adapters change the result

    fp = prepare_fast_path(model, FastPathOptions(compile=True, compile_backend="aot_eager"),
                           torch.device("cpu"), "fp32")
    assert fp.applied == ["compile (whole towers, aot_eager)"] and not fp.refused
    out_t, out_v = model(tokens, pixels)
    torch.testing.assert_close(out_t, ref_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_v, ref_v, rtol=1e-5, atol=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])  # each tower one graph, hooks inside
    (out_t.sum() + out_v.square().mean()).backward()
    assert all(p.grad is not None for p in model.trainable_parameters() if p is not model.logit_scale)
    with model.disable_adapters():  # hooks removed: dynamo's guards must recompile, not replay the adapted graph
        again_t, again_v = model(tokens, pixels)
    torch.testing.assert_close(again_v, frozen_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again_t, frozen_t, rtol=1e-5, atol=1e-6)
    fp.close()
    assert model.backbone.clip.visual._compiled_call_impl is None
    assert "encode_text" not in vars(model.backbone.clip)
    torch._dynamo.reset()


def test_whole_tower_compile_refused_over_recomputed_blocks(tiny_backbone_factory):
    model = _model(tiny_backbone_factory)
    undo = checkpoint_blocks([b for m in ("vision", "text") for b in model.backbone.blocks(m)])
    try:
        fp = prepare_fast_path(model, FastPathOptions(compile=True), torch.device("cpu"), "fp32")
        assert "compile" in fp.refused and "recomputation" in fp.refused["compile"]
        assert model.backbone.clip.visual._compiled_call_impl is None
        assert "compile" in fp.describe()
    finally:
        undo()


# -------------------------------------------------------------- bf16 frozen weights
def _loss_and_grads(model, tokens, pixels):
    for p in model.trainable_parameters():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t, v = model(tokens, pixels)
    loss = (t.float() @ v.float().mean(1).t()).logsumexp(0).sum()
    loss.backward()
    return t.detach(), v.detach(), [p.grad.clone() for p in model.trainable_parameters() if p.grad is not None]


def test_bf16_frozen_weights_bit_identical_under_autocast_and_undone_exactly(tiny_backbone_factory):
    model = _model(tiny_backbone_factory)
    tokens, pixels = _inputs(model)
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    ref = _loss_and_grads(model, tokens, pixels)
    fp = prepare_fast_path(model, FastPathOptions(bf16_frozen_weights=True), torch.device("cpu"), "bf16")
    assert fp.applied and fp.applied[0].startswith("bf16_frozen_weights")
    w = model.backbone.blocks("vision")[1].mlp.c_fc.weight
    assert w.dtype == torch.bfloat16  # really stored in bf16
    assert model.backbone.blocks("text")[0].attn.in_proj_weight.dtype == torch.bfloat16
    assert model.backbone.blocks("text")[0].mlp.c_fc.weight.dtype == torch.float32  # open_clip reads its dtype
    assert model.backbone.blocks("vision")[0].ln_1.weight.dtype == torch.float32  # norms stay fp32
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    got = _loss_and_grads(model, tokens, pixels)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert len(got[2]) == len(ref[2]) > 4 and all(torch.equal(a, b) for a, b in zip(got[2], ref[2]))
    fp.close()
    after = dict(model.backbone.named_parameters())
    assert all(after[n].dtype == t.dtype and torch.equal(after[n], t) for n, t in before.items())


def test_bf16_frozen_weights_refused_without_bf16_autocast(tiny_backbone_factory):
    model = _model(tiny_backbone_factory)
    fp = prepare_fast_path(model, FastPathOptions(bf16_frozen_weights=True), torch.device("cpu"), "fp32")
    assert "bf16_frozen_weights" in fp.refused and "change the results" in fp.refused["bf16_frozen_weights"]
    assert model.backbone.blocks("vision")[1].mlp.c_fc.weight.dtype == torch.float32


def test_full_finetune_weights_stay_fp32(tiny_backbone_factory):
    model = _model(tiny_backbone_factory, method="full_finetune")
    fp = prepare_fast_path(model, FastPathOptions(bf16_frozen_weights=True), torch.device("cpu"), "bf16")
    assert all(p.dtype == torch.float32 for p in model.backbone.parameters() if p.requires_grad)
    assert model.backbone.blocks("vision")[1].mlp.c_fc.weight.dtype == torch.float32
    fp.close()


def test_fused_option_switches_and_restores(tiny_backbone_factory):
    model = _model(tiny_backbone_factory)
    fp = prepare_fast_path(model, FastPathOptions(fused_adapters=True), torch.device("cpu"), "fp32")
    assert fused.is_enabled() and "fused_adapters" in fp.applied
    fp.close()
    assert not fused.is_enabled()


# ------------------------------------------------------------------- CUDA graphs
def _trainer(model):
    cfg = TrainConfig(lr=1e-3, precision="fp32", device="cpu", grad_clip=1.0, progress=False)
    return Trainer(model, SimilarityHead("mean"), cfg, total_steps=20, device=torch.device("cpu"))


def _batch(model, seed):
    tokens, pixels = _inputs(model, seed=seed)
    return {"tokens": tokens, "pixels": pixels, "frame_mask": torch.ones(2, 3, dtype=torch.bool),
            "captions": [f"c{seed}", "x"], "index": torch.tensor([seed, seed + 1])}


def test_device_step_equals_the_engine_step(tiny_backbone_factory):
    engine_model, graph_model = _model(tiny_backbone_factory), _model(tiny_backbone_factory)
    engine, graphed = _trainer(engine_model), _trainer(graph_model)
    step = make_device_step(graphed)
    for s in range(2):
        batch = _batch(engine_model, s)
        res = engine.step([dict(batch)])
        values = step(dict(batch))
        graphed.scheduler.step()
        # the engine's StepResult layout: loss, t2v, v2t, grad_norm, logit_scale, nonfinite, skipped
        assert values.shape == res.values.shape == (len(STEP_FIELDS),)
        torch.testing.assert_close(values, res.values, rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(engine_model.named_trainable_parameters(), graph_model.named_trainable_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_cuda_graph_step_replays_new_batches_and_follows_the_schedule(tiny_backbone_factory):
    ref_model, graph_model = _model(tiny_backbone_factory), _model(tiny_backbone_factory)
    ref, graphed = _trainer(ref_model), _trainer(graph_model)
    ref_step = make_device_step(ref)
    runner = CudaGraphStep(make_device_step(graphed), _batch(graph_model, 0), optimizer=graphed.optimizer,
                           warmup=1, emulate=True)
    losses = []
    for s in range(4):
        batch = _batch(graph_model, 10 + s)
        want = ref_step(dict(batch))
        ref.scheduler.step()
        got = runner(batch)
        graphed.scheduler.step()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        losses.append(float(got[0]))
        assert isinstance(graphed.optimizer.param_groups[0]["lr"], float)  # the Python world sees floats
    assert runner.replays == 3 and runner.graph == "emulated"
    assert len(set(losses)) == 4  # every replay read its own batch from the static buffers
    assert graphed.optimizer.param_groups[0]["capturable"]
    # the schedule reached the replays: parameters follow the reference, whose lr changed every step
    assert ref.optimizer.param_groups[0]["lr"] != ref.optimizer.param_groups[0]["initial_lr"]
    for (n, a), (_, b) in zip(ref_model.named_trainable_parameters(), graph_model.named_trainable_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_cuda_graph_step_refuses_other_shapes_and_cpu(tiny_backbone_factory):
    model = _model(tiny_backbone_factory)
    batch = _batch(model, 0)
    with pytest.raises(XModalError, match="cuda_graphs: needs a CUDA device"):
        CudaGraphStep(lambda b: b["pixels"].sum(), batch)
    runner = CudaGraphStep(lambda b: b["pixels"].sum(), batch, warmup=0, emulate=True)
    assert runner.matches(_batch(model, 5))  # new captions / index are fine
    short = dict(batch, pixels=batch["pixels"][:, :2], frame_mask=batch["frame_mask"][:, :2])
    assert not runner.matches(short)
    with pytest.raises(XModalError, match=r"batch\['pixels'\] is \(2, 2, 3, 32, 32\)"):
        runner(short)
    with pytest.raises(XModalError, match="does not read"):
        runner(dict(batch, desc_tokens=torch.zeros(2, 1, 4)))
    assert not runner.matches(dict(batch, desc_kind="other"))
    torch.testing.assert_close(runner(batch), batch["pixels"].sum())


# ----------------------------------------------------- backward work of high sites
def _backward_mm_count(model, tokens, pixels) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "bmm", "addmm", "baddbmm", "convolution_backward"):
                Count.n += 1
            return func(*args, **(kwargs or {}))

    t, v = model(tokens, pixels)
    loss = t.square().sum() + v.square().sum()
    with Count():
        loss.backward()
    return Count.n


def test_msta_backward_stops_at_its_lowest_site(tiny_backbone_factory):
    """MSTA adapts only the top blocks: nothing below its lowest site may be recorded for
    backward (its outputs need no gradient), and backward does far less matmul work than
    full fine-tuning's."""
    msta = _model(lambda s: tiny_backbone_factory(s, "xmodal-tiny"), method="msta", init="kaiming_all")
    lowest = {m: min(msta.method.layer_ids[m]) for m in ("vision", "text")}
    assert all(v > 0 for v in lowest.values()), lowest  # the default places MSTA high in both towers
    needs_grad = {}
    hooks = [b.register_forward_hook(lambda mod, a, out, key=(m, i): needs_grad.__setitem__(key, out.requires_grad))
             for m in ("vision", "text") for i, b in enumerate(msta.backbone.blocks(m))]
    tokens = msta.tokenize(["a dog runs", "a cat sits"])
    pixels = torch.randn(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    msta_mm = _backward_mm_count(msta, tokens, pixels)
    for h in hooks:
        h.remove()
    for (m, i), flag in needs_grad.items():
        assert flag == (i >= lowest[m]), (m, i, flag, lowest)
    ft = _model(lambda s: tiny_backbone_factory(s, "xmodal-tiny"), method="full_finetune")
    ft_mm = _backward_mm_count(ft, tokens, pixels)
    assert 0 < msta_mm < 0.6 * ft_mm, (msta_mm, ft_mm)


def test_msta_recompute_reruns_only_blocks_above_its_lowest_site(tiny_backbone_factory):
    """With the frozen blocks recomputed in backward, no block below MSTA's lowest site is rerun."""
    msta = _model(lambda s: tiny_backbone_factory(s, "xmodal-tiny"), method="msta", init="kaiming_all")
    lowest = min(msta.method.layer_ids["vision"])
    blocks = msta.backbone.blocks("vision")
    undo = checkpoint_blocks([b for m in ("vision", "text") for b in msta.backbone.blocks(m)])
    calls = {i: 0 for i in range(len(blocks))}
    phase = {"backward": False}

    def count(i):
        def hook(mod, args, out):
            if phase["backward"]:
                calls[i] += 1
        return hook

    hooks = [b.ln_1.register_forward_hook(count(i)) for i, b in enumerate(blocks)]
    try:
        t, v = msta(msta.tokenize(["a dog runs", "a cat sits"]),
                    torch.randn(2, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
        phase["backward"] = True
        (t.square().sum() + v.square().sum()).backward()
    finally:
        for h in hooks:
            h.remove()
        undo()
    assert lowest > 0 and all(calls[i] == 0 for i in range(lowest)), calls  # frozen blocks below: never rerun
    # above: rerun at most once each, and the top block's internals (fed by an adapted stream) really are
    assert all(calls[i] <= 1 for i in range(lowest, len(blocks))) and calls[len(blocks) - 1] == 1, calls
