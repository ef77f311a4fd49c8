"""Pretrained weight loading: the four checkpoint formats round-trip exactly; errors are one clear line.

The ViT-B-32 round trips write checkpoints with the real key names and shapes (random values,
rounded to fp16 so fp16 files are lossless) and check that a model built from another seed
and loaded from the file gives the source model's text/image embeddings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from xmodal.backbones import weights as W
from xmodal.backbones.factory import create_backbone
from xmodal.errors import WeightsNotFoundError, XModalError

TEXTS = ["a dog runs along the beach", "two people cooking pasta"]
LAION_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """No real cache of this machine can satisfy (or spoil) a test; no downloads."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    for var in ("HF_HOME", "XDG_CACHE_HOME", "HUGGINGFACE_HUB_CACHE", "XMODAL_ALLOW_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _embed(model, tokens, images):
    with torch.no_grad():
        return model.encode_text(tokens), model.encode_image(images)


def _assert_same_embeddings(model, ref):
    text, image = _embed(model, ref.tokens, ref.images)
    assert torch.allclose(text, ref.text, rtol=0, atol=1e-5), (text - ref.text).abs().max()
    assert torch.allclose(image, ref.image, rtol=0, atol=1e-5), (image - ref.image).abs().max()


def _make_source(name, seed, image_size):
    model = create_backbone(name, seed=seed)
    with torch.no_grad():  # fp16-representable values: fp16 checkpoints are then lossless
        for p in model.clip.parameters():
            p.copy_(p.half().float())
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, image_size, image_size, generator=gen)
    tokens = model.tokenize(TEXTS)
    text, image = _embed(model, tokens, images)
    return SimpleNamespace(model=model, tokens=tokens, images=images, text=text, image=image)


@pytest.fixture(scope="module")
def b32():
    return _make_source("ViT-B-32", seed=1, image_size=224)


@pytest.fixture(scope="module")
def b32_quick(b32):
    """Reference embeddings of the same weights under QuickGELU (what OpenAI checkpoints expect)."""
    with _quick_gelu(b32.model.clip):
        text, image = _embed(b32.model, b32.tokens, b32.images)
    assert not torch.allclose(text, b32.text, atol=1e-5)  # the activation matters
    return SimpleNamespace(tokens=b32.tokens, images=b32.images, text=text, image=image)


@pytest.fixture
def tiny():
    return _make_source("xmodal-test", seed=1, image_size=32)


@contextlib.contextmanager
def _quick_gelu(clip):
    W.set_quick_gelu(clip, True)
    try:
        yield clip
    finally:
        W.set_quick_gelu(clip, False)


def _state(clip, dtype=None):
    out = {}
    for k, v in clip.state_dict().items():
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v.clone()
    return out


def _vit_b32_hf_keys():
    """Key names and shapes of a Hugging Face CLIPModel for ViT-B/32 (openai/clip-vit-base-patch32)."""
    keys = {
        "logit_scale": (),
        "text_projection.weight": (512, 512),
        "visual_projection.weight": (512, 768),
        "text_model.embeddings.token_embedding.weight": (49408, 512),
        "text_model.embeddings.position_embedding.weight": (77, 512),
        "text_model.final_layer_norm.weight": (512,),
        "text_model.final_layer_norm.bias": (512,),
        "vision_model.embeddings.class_embedding": (768,),
        "vision_model.embeddings.patch_embedding.weight": (768, 3, 32, 32),
        "vision_model.embeddings.position_embedding.weight": (50, 768),
        "vision_model.pre_layrnorm.weight": (768,),
        "vision_model.pre_layrnorm.bias": (768,),
        "vision_model.post_layernorm.weight": (768,),
        "vision_model.post_layernorm.bias": (768,),
    }
    for tower, w in (("text", 512), ("vision", 768)):
        for i in range(12):
            p = f"{tower}_model.encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                keys[p + f"self_attn.{proj}.weight"] = (w, w)
                keys[p + f"self_attn.{proj}.bias"] = (w,)
            for ln in ("layer_norm1", "layer_norm2"):
                keys[p + f"{ln}.weight"] = (w,)
                keys[p + f"{ln}.bias"] = (w,)
            keys[p + "mlp.fc1.weight"] = (4 * w, w)
            keys[p + "mlp.fc1.bias"] = (4 * w,)
            keys[p + "mlp.fc2.weight"] = (w, 4 * w)
            keys[p + "mlp.fc2.bias"] = (w,)
    return keys


# ------------------------------------------------------------ the four formats, ViT-B-32
def test_a_openclip_tag_from_local_hub_cache(b32, tmp_path):
    cache = tmp_path / "cache"
    repo_dir = cache / ("models--" + LAION_REPO.replace("/", "--"))
    snap = repo_dir / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123abcd")
    save_file(_state(b32.model.clip, torch.float16), str(snap / "open_clip_model.safetensors"), metadata={"format": "pt"})

    model = create_backbone("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(cache), seed=2)
    assert model.pretrained.startswith("laion2b_s34b_b79k (local cache: ")
    assert str(snap / "open_clip_model.safetensors") in model.pretrained
    assert model.clip.visual.conv1.weight.dtype == torch.float32
    assert W.uses_quick_gelu(model.clip) == {"vision": False, "text": False}  # tag trained with GELU
    assert model.pretrained.endswith("; activation GELU (as OpenCLIP tag laion2b_s34b_b79k was trained)")
    file = snap / "open_clip_model.safetensors"
    assert model.weights_info == {
        "pretrained": "laion2b_s34b_b79k", "weights_path": str(file),
        "weights_sha256": hashlib.sha256(file.read_bytes()).hexdigest(), "activation": "gelu", "format": "openclip-tag",
    }
    _assert_same_embeddings(model, b32)


def test_b_openai_plain_state_dict(b32, b32_quick, tmp_path):
    # OpenAI layout: fp16 matrices, fp32 norms/embeddings, plus its non-parameter entries
    state = {}
    for k, v in b32.model.clip.state_dict().items():
        state[k] = v.half() if v.dim() >= 2 and "embedding" not in k else v.clone()
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-B-32.pt"
    torch.save(state, path)

    model = create_backbone("ViT-B-32", pretrained=str(path), seed=2)
    assert model.pretrained.startswith(str(path))
    # OpenAI's own entries say the weights were trained with QuickGELU
    assert W.uses_quick_gelu(model.clip) == {"vision": True, "text": True}
    _assert_same_embeddings(model, b32_quick)


def test_b_openai_torchscript_archive(b32, b32_quick, tmp_path):
    path = tmp_path / "ViT-B-32.pt"
    with _quick_gelu(b32.model.clip):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = torch.jit.script(b32.model.clip)
            torch.jit.save(scripted, str(path))
        del scripted
    sd, info = W.read_checkpoint(path)
    assert info["format"] == "torchscript" and info["quick_gelu"] is True
    assert set(sd) - set(b32.model.clip.state_dict()) == {"attn_mask"}  # a non-persistent buffer
    del sd

    model = create_backbone("ViT-B-32", pretrained=str(path), seed=2)
    assert W.uses_quick_gelu(model.clip) == {"vision": True, "text": True}
    assert model.pretrained.startswith(f"{path.resolve()} (TorchScript archive); activation QuickGELU (set to match")
    assert model.weights_info["format"] == "openai-torchscript" and model.weights_info["activation"] == "quick_gelu"
    _assert_same_embeddings(model, b32_quick)


def test_c_openclip_training_checkpoint_with_ddp_prefix(b32, tmp_path):
    path = tmp_path / "epoch_32.pt"
    wrapped = {f"module.{k}": v for k, v in _state(b32.model.clip).items()}
    torch.save({"epoch": 32, "name": "run", "state_dict": wrapped, "optimizer": {"state": {}, "param_groups": []}}, path)
    del wrapped

    model = create_backbone("ViT-B-32", seed=2)
    before_text, _ = _embed(model, b32.tokens, b32.images)
    assert not torch.allclose(before_text, b32.text, atol=1e-3)  # a different model before loading
    source = W.load_pretrained(model.clip, "ViT-B-32", str(path))
    # the file says nothing about its activation: the architecture's is kept, and the description says so
    assert source == f"{path.resolve()}; activation GELU (the architecture's default: the weights do not say " \
        f"which activation they were trained with)"
    assert W.uses_quick_gelu(model.clip) == {"vision": False, "text": False}  # file says nothing: unchanged
    _assert_same_embeddings(model, b32)


def test_d_huggingface_clipmodel_directory(b32, tmp_path):
    clip = b32.model.clip
    hf = W.openclip_to_hf(clip.state_dict())
    expected = _vit_b32_hf_keys()
    assert {k: tuple(v.shape) for k, v in hf.items()} == expected
    # semantics of the mapping, not only names: q|k|v blocks of in_proj, transposed projections
    blk = clip.visual.transformer.resblocks[11].attn
    assert torch.equal(hf["vision_model.encoder.layers.11.self_attn.q_proj.weight"], blk.in_proj_weight[:768])
    assert torch.equal(hf["vision_model.encoder.layers.11.self_attn.k_proj.bias"], blk.in_proj_bias[768:1536])
    assert torch.equal(hf["vision_model.encoder.layers.11.self_attn.v_proj.weight"], blk.in_proj_weight[1536:])
    assert torch.equal(hf["text_projection.weight"], clip.text_projection.t())
    assert torch.equal(hf["visual_projection.weight"], clip.visual.proj.t())
    # older transformers stored position_ids buffers; real checkpoints carry them
    hf["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    hf["vision_model.embeddings.position_ids"] = torch.arange(50).unsqueeze(0)
    directory = tmp_path / "clip-vit-base-patch32"
    directory.mkdir()
    config = W.hf_config_for(clip)
    assert config["text_config"]["hidden_act"] == "gelu"
    (directory / "config.json").write_text(json.dumps(config))
    save_file(hf, str(directory / "model.safetensors"), metadata={"format": "pt"})
    del hf

    model = create_backbone("ViT-B-32", pretrained=str(directory), seed=2)
    assert model.pretrained == f"{directory.resolve()} (Hugging Face CLIPModel); activation GELU (from config.json hidden_act)"
    assert model.weights_info["format"] == "hf-directory" and model.weights_info["weights_path"] == str(directory.resolve())
    _assert_same_embeddings(model, b32)


# ---------------------------------------------------------------- quick tests (tiny)
def test_missing_file_names_architecture_and_four_options(tmp_path):
    missing = tmp_path / "ViT-B-32.pt"
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("ViT-B-32", pretrained=str(missing))
    msg = str(err.value)
    assert "ViT-B-32" in msg and str(missing) in msg and "does not exist" in msg
    for option in ("(a)", "(b)", "(c)", "(d)"):
        assert option in msg
    assert "timm/vit_base_patch32_clip_224.openai" in msg  # a concrete cache example for (a)
    assert "\n" not in msg


def test_tag_not_in_local_cache_is_one_message(tmp_path):
    with pytest.raises(WeightsNotFoundError) as err:
        create_backbone("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path / "empty"))
    msg = str(err.value)
    assert "not in a local cache" in msg and f"hub repo {LAION_REPO}" in msg and str(tmp_path / "empty") in msg
    assert f"huggingface-cli download {LAION_REPO}`" in msg  # the example names the requested tag's repo
    assert all(o in msg for o in ("(a)", "(b)", "(c)", "(d)"))
    assert err.value.__cause__ is None and err.value.__context__ is None


def test_unknown_tag_lists_valid_tags():
    with pytest.raises(XModalError) as err:
        create_backbone("ViT-B-32", pretrained="laion5b_nope")
    assert not isinstance(err.value, WeightsNotFoundError)
    msg = str(err.value)
    assert "laion5b_nope" in msg and "openai" in msg and "laion2b_s34b_b79k" in msg
    with pytest.raises(XModalError, match="tags of xmodal-test: none"):
        create_backbone("xmodal-test", pretrained="openai")


def test_hub_client_errors_never_leak(monkeypatch, tmp_path):
    calls = []

    class FakeHubError(OSError):
        pass

    def fake_download(cfg, cache_dir=None, **kw):
        calls.append(cfg)
        raise FakeHubError("Cannot reach https://huggingface.co\nTraceback (most recent call last): ...")

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained", fake_download)
    # offline mode: the hub client is never called
    monkeypatch.setenv("XMODAL_ALLOW_DOWNLOAD", "1")
    with pytest.raises(WeightsNotFoundError):
        W.resolve_pretrained("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert calls == []
    # downloads allowed: the client's failure becomes one line, without chained traceback
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WeightsNotFoundError) as err:
        W.resolve_pretrained("ViT-B-32", "openai", cache_dir=str(tmp_path))
    assert len(calls) == 1
    msg = str(err.value)
    assert "download failed (FakeHubError: Cannot reach https://huggingface.co)" in msg
    assert "Traceback" not in msg and err.value.__cause__ is None and err.value.__suppress_context__


def test_tag_resolution_cache_layouts(tmp_path):
    # the default Hugging Face hub cache (HF_HUB_CACHE); the ref `main` names the snapshot
    repo_dir = Path(os.environ["HF_HUB_CACHE"]) / "models--timm--vit_base_patch32_clip_224.openai"
    old, new = repo_dir / "snapshots" / "old", repo_dir / "snapshots" / "new"
    for snap in (new, old):
        snap.mkdir(parents=True)
        (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("new\n")
    src = W.resolve_pretrained("ViT-B-32", "openai")
    assert src.path == new / "open_clip_pytorch_model.bin" and src.kind == W.KIND_FILE
    assert src.quick_gelu is True  # the openai tag was trained with QuickGELU
    (new / "open_clip_model.safetensors").write_bytes(b"x")  # safetensors preferred, as open_clip does
    assert W.resolve_pretrained("ViT-B-32", "openai").path == new / "open_clip_model.safetensors"
    # an explicit cache_dir is searched first: open_clip's URL cache layout (OpenAI's ViT-B-32.pt) ...
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "ViT-B-32.pt").write_bytes(b"x")
    assert W.resolve_pretrained("ViT-B-32", "openai", cache_dir=str(cache)).path == cache / "ViT-B-32.pt"
    # ... and a `huggingface-cli download --local-dir CACHE/<repo name>` copy before it
    local = cache / "vit_base_patch32_clip_224.openai"
    local.mkdir()
    (local / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert W.resolve_pretrained("ViT-B-32", "openai", cache_dir=str(cache)).path == local / "open_clip_pytorch_model.bin"
    # tags are matched as open_clip matches them (case, dashes)
    assert W.resolve_pretrained("ViT-B-32", "OpenAI", cache_dir=str(cache)).path == local / "open_clip_pytorch_model.bin"


def test_pickle_needing_code_execution_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"visual.proj": Evil()}}, path)
    with pytest.raises(XModalError) as err:
        create_backbone("xmodal-test", pretrained=str(path))
    msg = str(err.value)
    assert str(path.resolve()) in msg and "refusing to load" in msg and "makedirs" in msg
    assert not marker.exists()
    # the same file inside a HF directory is refused too
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    os.replace(path, hf_dir / "pytorch_model.bin")
    (hf_dir / "config.json").write_text(json.dumps(W.hf_config_for(create_backbone("xmodal-test").clip)))
    with pytest.raises(XModalError, match="refusing to load"):
        create_backbone("xmodal-test", pretrained=str(hf_dir))
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".bin", ".pth"])
def test_module_prefix_is_stripped(tiny, tmp_path, suffix):
    path = tmp_path / f"open_clip_pytorch_model{suffix}"
    torch.save({"state_dict": {f"module.{k}": v for k, v in _state(tiny.model.clip).items()}}, path)
    model = create_backbone("xmodal-test", pretrained=str(path), seed=3)
    _assert_same_embeddings(model, tiny)


def test_wrong_architecture_is_a_clear_shape_error(tmp_path):
    other = create_backbone("xmodal-tiny", seed=0)
    path = W.save_openclip_checkpoint(other, tmp_path / "tiny.safetensors")
    model = create_backbone("xmodal-test", seed=0)
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    with pytest.raises(XModalError) as err:
        W.load_pretrained(model.clip, "xmodal-test", str(path))
    msg = str(err.value)
    assert str(path.resolve()) in msg and "architecture xmodal-test" in msg
    assert "shape mismatches" in msg and "checkpoint (256," in msg and "vs model (64," in msg
    assert "unexpected keys" in msg and "resblocks.2." in msg  # tiny has 6 blocks, test has 2
    assert all(torch.equal(v, model.clip.state_dict()[k]) for k, v in before.items())  # untouched


def test_missing_keys_are_named(tiny, tmp_path):
    state = _state(tiny.model.clip)
    del state["visual.proj"], state["ln_final.bias"]
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(XModalError, match=r"2 keys missing from the checkpoint \(first: visual.proj, ln_final.bias\)"):
        create_backbone("xmodal-test", pretrained=str(path))


def test_save_openclip_checkpoint_fp16_keeps_activation(tiny, tmp_path):
    W.set_quick_gelu(tiny.model.clip, True)
    text, image = _embed(tiny.model, tiny.tokens, tiny.images)
    ref = SimpleNamespace(tokens=tiny.tokens, images=tiny.images, text=text, image=image)
    path = W.save_openclip_checkpoint(tiny.model, tmp_path / "out" / "xmodal-test.safetensors", fp16=True)
    assert sorted(os.listdir(path.parent)) == ["xmodal-test.safetensors"]  # no temp file left behind
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()[W.ACTIVATION_META] == "quick_gelu"
        assert fh.get_tensor("visual.conv1.weight").dtype == torch.float16
    model = create_backbone("xmodal-test", pretrained=str(path), seed=4)
    assert W.uses_quick_gelu(model.clip) == {"vision": True, "text": True}
    assert model.clip.visual.conv1.weight.dtype == torch.float32
    _assert_same_embeddings(model, ref)  # lossless: source values are fp16-representable
    with pytest.raises(XModalError, match=r"must end in \.safetensors"):
        W.save_openclip_checkpoint(tiny.model, tmp_path / "x.pt")


def test_directory_prefers_openclip_file_over_hf_files(tiny, tmp_path):
    # laion hub repos hold both an open_clip file and HF CLIPModel files
    directory = tmp_path / "repo"
    W.save_hf_clip(tiny.model, directory)
    W.save_openclip_checkpoint(tiny.model, directory / "open_clip_model.safetensors")
    src = W.resolve_pretrained("xmodal-test", str(directory))
    assert src.kind == W.KIND_FILE and src.path.name == "open_clip_model.safetensors"
    (directory / "open_clip_model.safetensors").unlink()
    assert W.resolve_pretrained("xmodal-test", str(directory)).kind == W.KIND_HF
    (directory / "model.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="has config.json but none of model.safetensors"):
        W.resolve_pretrained("xmodal-test", str(directory))


def test_hf_sharded_and_bin_directories(tiny, tmp_path):
    directory = W.save_hf_clip(tiny.model, tmp_path / "hf")
    tensors = load_file(str(directory / "model.safetensors"))
    (directory / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / shard))
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_same_embeddings(create_backbone("xmodal-test", pretrained=str(directory), seed=5), tiny)

    bin_dir = tmp_path / "hf_bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((directory / "config.json").read_text())
    torch.save({**tensors, "text_model.embeddings.position_ids": torch.arange(77)[None]}, bin_dir / "pytorch_model.bin")
    _assert_same_embeddings(create_backbone("xmodal-test", pretrained=str(bin_dir), seed=6), tiny)


def test_hf_config_must_match_architecture(tiny, tmp_path):
    directory = W.save_hf_clip(tiny.model, tmp_path / "hf")
    config = json.loads((directory / "config.json").read_text())
    config["text_config"]["num_attention_heads"] = 4  # heads do not show in parameter shapes
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(XModalError, match="text_config.num_attention_heads=4 but xmodal-test has 2"):
        create_backbone("xmodal-test", pretrained=str(directory))
    config["text_config"]["num_attention_heads"] = 2
    config["model_type"] = "siglip"
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(XModalError, match="model_type 'siglip' is not a HF CLIPModel"):
        create_backbone("xmodal-test", pretrained=str(directory))


def test_hf_conversion_rejects_incomplete_attention(tiny):
    hf = W.openclip_to_hf(tiny.model.clip.state_dict())
    del hf["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(XModalError, match=r"text_model.encoder.layers.1.self_attn is missing k_proj.weight"):
        W.hf_to_openclip(hf, "ckpt")
    hf["vision_model.encoder.layers.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(XModalError, match="does not know"):
        W.hf_to_openclip(hf, "ckpt")


def test_corrupt_files_fail_with_the_path(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(XModalError, match="not a readable safetensors file"):
        W.read_checkpoint(bad)
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(XModalError, match="trunc.pt: not a readable zip archive"):
        W.read_checkpoint(trunc)
