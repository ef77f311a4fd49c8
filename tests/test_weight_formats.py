"""Weight-format fidelity: OpenAI archives read without torch.jit.load, bit for bit; activation inferred; provenance.

OpenAI-layout models come from `tests/openai_layout.py` (OpenAI's own module code): their
`state_dict()` is what `clip.load(..., jit=False)` gives and `torch.jit.trace` of them is laid
out like OpenAI's released `.pt` archives. `torch.jit.load` appears here only as the reference,
on archives these tests traced themselves.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from openai_layout import convert_weights_to_fp16, openai_clip_like, trace_archive
from xmodal.backbones import weights as W
from xmodal.backbones.factory import create_backbone
from xmodal.errors import XModalError
from xmodal.safe_pickle import read_torchscript

TEXTS = ["a dog runs along the beach", "two people cooking pasta"]


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    for var in ("HF_HOME", "XDG_CACHE_HOME", "HUGGINGFACE_HUB_CACHE", "XMODAL_ALLOW_DOWNLOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def no_jit_load(monkeypatch):
    """Any call of torch.jit.load by xmodal fails the test."""

    def refuse(*a, **k):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)


@pytest.fixture(scope="module")
def source():
    """An open_clip xmodal-test model with fp16-representable weights, and OpenAI's code holding the same weights."""
    model = create_backbone("xmodal-test", seed=11)
    with torch.no_grad():
        for p in model.clip.parameters():
            p.copy_(p.half().float())
    openai = openai_clip_like(model.clip)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        image, text = openai(images, tokens)  # OpenAI's code runs QuickGELU
        W.set_quick_gelu(model.clip, False)
        gelu_text = model.encode_text(tokens)
    assert (gelu_text - text).abs().max() > 1e-3  # the activation matters for these weights
    return model, openai, images, tokens, image, text


def _embed(model, tokens, images):
    with torch.no_grad():
        return model.encode_text(tokens), model.encode_image(images)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8) if t.numel() else t


def _jit_reference(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").state_dict()


# ------------------------------------------------------------- TorchScript archives
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_traced_openai_archive_is_read_bit_identical_to_jit_load(source, tmp_path, fp16, monkeypatch):
    model, _, images, tokens, ref_image, ref_text = source
    openai = openai_clip_like(model.clip)
    if fp16:
        convert_weights_to_fp16(openai)  # OpenAI's released archives: fp16 matrices, fp32 norms
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        openai.__dict__.pop(key, None)
        openai.register_buffer(key, torch.tensor(value))  # released archives carry these as buffers
    path = trace_archive(openai, tmp_path / "ViT-test.pt")
    reference = _jit_reference(path)
    assert "input_resolution" in reference

    archive = read_torchscript(bytearray(path.read_bytes()), str(path))
    assert list(archive.state_dict) == list(reference)  # same names, same order
    for key, ref in reference.items():
        got = archive.state_dict[key]
        assert (got.dtype, got.shape, got.stride()) == (ref.dtype, ref.shape, ref.stride()), key
        assert torch.equal(_bits(got), _bits(ref)), key
    if fp16:
        assert reference["visual.proj"].dtype == torch.float16 and reference["visual.ln_pre.weight"].dtype == torch.float32

    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load was called"))
    loaded = create_backbone("xmodal-test", pretrained=str(path), seed=3)
    assert W.uses_quick_gelu(loaded.clip) == {"vision": True, "text": True}
    assert "(TorchScript archive); activation QuickGELU (set to match the weights" in loaded.pretrained
    info = loaded.weights_info
    assert info == {
        "pretrained": str(path), "weights_path": str(path.resolve()),
        "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "activation": "quick_gelu", "format": "openai-torchscript",
    }
    text, image = _embed(loaded, tokens, images)
    torch.testing.assert_close(text, ref_text, rtol=0, atol=1e-5)  # fp16 weights are exact: source is fp16-representable
    torch.testing.assert_close(image, ref_image, rtol=0, atol=1e-5)


def test_archive_with_gelu_modules_keeps_gelu(source, tmp_path, no_jit_load):
    model = create_backbone("xmodal-test", seed=11)
    W.set_quick_gelu(model.clip, True)  # a QuickGELU *architecture* ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        archive_model = create_backbone("xmodal-test", seed=11).clip  # ... and an archive traced with nn.GELU
        torch.jit.save(torch.jit.script(archive_model), str(tmp_path / "gelu.pt"))
    sd, info = W.read_checkpoint(tmp_path / "gelu.pt")
    assert info["format"] == "torchscript" and info["quick_gelu"] is False
    desc = W.load_pretrained(model.clip, "xmodal-test", str(tmp_path / "gelu.pt"))
    assert W.uses_quick_gelu(model.clip) == {"vision": False, "text": False}
    assert "activation GELU (set to match the weights: the archive's MLP modules are GELU)" in desc


# ---------------------------------------------------------- OpenAI plain state dicts
@pytest.mark.parametrize("variant", ["fp32", "openai-fp16-mix", "legacy-format", "no-extension"])
def test_openai_state_dict_without_meta_entries_runs_quick_gelu(source, tmp_path, variant, no_jit_load):
    """What clip.load(..., jit=False).state_dict() gives: no input_resolution/context_length/vocab_size."""
    model, openai, images, tokens, ref_image, ref_text = source
    net = openai_clip_like(model.clip)
    if variant == "openai-fp16-mix":
        convert_weights_to_fp16(net)  # clip.load on a GPU
    state = net.state_dict()
    assert not any(k in state for k in W.OPENAI_META_KEYS)
    path = tmp_path / ("ViT-test" if variant == "no-extension" else "ViT-test.pt")
    torch.save(state, path, _use_new_zipfile_serialization=variant != "legacy-format")

    loaded = create_backbone("xmodal-test", pretrained=str(path), seed=4)
    assert W.uses_quick_gelu(loaded.clip) == {"vision": True, "text": True}
    assert loaded.weights_info["format"] == "openai-state-dict"
    assert loaded.weights_info["activation"] == "quick_gelu"
    assert "(OpenAI state dict); activation QuickGELU (set to match the weights: OpenAI weights (its blocks are " \
           "in the module order of OpenAI's CLIP code" in loaded.pretrained
    text, image = _embed(loaded, tokens, images)
    torch.testing.assert_close(text, ref_text, rtol=0, atol=1e-5)
    torch.testing.assert_close(image, ref_image, rtol=0, atol=1e-5)


def test_open_clip_state_dict_keeps_the_architecture_activation_and_says_so(source, tmp_path):
    model = source[0]
    path = tmp_path / "openclip.pt"
    torch.save(model.clip.state_dict(), path)  # open_clip's module order: ln_1 before attn
    loaded = create_backbone("xmodal-test", pretrained=str(path), seed=4)
    assert W.uses_quick_gelu(loaded.clip) == {"vision": False, "text": False}
    assert loaded.weights_info["format"] == "openclip-state-dict" and loaded.weights_info["activation"] == "gelu"
    assert loaded.pretrained.endswith("; activation GELU (the architecture's default: the weights do not say which "
                                      "activation they were trained with)")


def test_openai_meta_entries_still_mean_openai(source, tmp_path):
    model = source[0]
    state = dict(model.clip.state_dict())  # open_clip order, but OpenAI's own entries
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "with_meta.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = create_backbone("xmodal-test", pretrained=str(path), seed=4)
    assert W.uses_quick_gelu(loaded.clip) == {"vision": True, "text": True}
    assert "input_resolution/context_length/vocab_size entries" in loaded.pretrained


# ---------------------------------------------------------- files that are not weights
def _hf_config():
    return json.dumps(W.hf_config_for(create_backbone("xmodal-test").clip))


NOT_CHECKPOINTS = {
    "empty": (lambda d: b"", "the file is empty (0 bytes)"),
    "json": (lambda d: b'{"lr": 0.001, "epochs": 3}', "a JSON file"),
    "hf_config": (lambda d: _hf_config().encode(), "a Hugging Face config.json, not weights; pass the directory"),
    "text": (lambda d: b"these are my notes about CLIP\nsecond line\n", "a text file"),
    "random": (lambda d: bytes(range(7, 250)) * 40, "not a checkpoint in any format xmodal reads"),
    "hf_index": (lambda d: b'{"metadata": {}, "weight_map": {"a": "model-00001.safetensors"}}', "weight index"),
}


@pytest.mark.parametrize("kind", sorted(NOT_CHECKPOINTS))
@pytest.mark.parametrize("suffix", [".pt", ".bin", ""])
def test_files_that_are_not_checkpoints_say_what_they_are(tmp_path, kind, suffix):
    make, expected = NOT_CHECKPOINTS[kind]
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(make(tmp_path))
    with pytest.raises(XModalError) as err:
        create_backbone("xmodal-test", pretrained=str(path))
    msg = str(err.value)
    assert msg.startswith(f"{path.resolve()}: ") and expected in msg, msg
    assert "\n" not in msg and "code execution" not in msg and err.value.__cause__ is None
    if kind != "hf_config" and kind != "hf_index":
        assert "expected a checkpoint: an OpenAI .pt" in msg  # what to pass instead


def test_lone_hf_model_safetensors_asks_for_its_directory(tmp_path):
    directory = W.save_hf_clip(create_backbone("xmodal-test"), tmp_path / "hf")
    lone = tmp_path / "model.safetensors"
    (directory / "model.safetensors").rename(lone)
    with pytest.raises(XModalError) as err:
        create_backbone("xmodal-test", pretrained=str(lone))
    msg = str(err.value)
    assert "holds Hugging Face CLIPModel weights" in msg and "pass the directory that holds both" in msg
    assert "\n" not in msg


# ---------------------------------------------------------------- weights_info
def test_weights_info_random_and_packaged(tmp_path):
    for pretrained in (None, "random"):
        model = create_backbone("xmodal-test", pretrained=pretrained)
        assert model.weights_info == {"pretrained": "random", "weights_path": None, "weights_sha256": None,
                                      "activation": "gelu", "format": "random"}
    packaged = create_backbone("xmodal-tiny", pretrained="xmodal")
    info = packaged.weights_info
    assert tuple(info) == W.WEIGHTS_INFO_KEYS
    assert info["pretrained"] == "xmodal" and info["format"] == "xmodal-packaged"
    assert info["weights_path"] == str(W.EMBEDDED["xmodal-tiny"])
    assert info["weights_sha256"] == hashlib.sha256(W.EMBEDDED["xmodal-tiny"].read_bytes()).hexdigest()
    with pytest.raises(XModalError, match="or 'random' for random weights"):
        create_backbone("xmodal-test", pretrained="randm")


def test_weights_info_of_files_and_directories(source, tmp_path):
    model = source[0]
    path = W.save_openclip_checkpoint(model, tmp_path / "ckpt" / "w.safetensors")
    loaded = create_backbone("xmodal-test", pretrained=str(path))
    assert loaded.weights_info == {"pretrained": str(path), "weights_path": str(path.resolve()),
                                   "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                   "activation": "gelu", "format": "openclip-state-dict"}
    # a directory holding an OpenCLIP file: the directory as given, the file as read
    (tmp_path / "ckpt" / "open_clip_model.safetensors").write_bytes(path.read_bytes())
    loaded = create_backbone("xmodal-test", pretrained=str(tmp_path / "ckpt"))
    assert loaded.weights_info["pretrained"] == str(tmp_path / "ckpt")
    assert loaded.weights_info["weights_path"] == str((tmp_path / "ckpt" / "open_clip_model.safetensors").resolve())
    hf = W.save_hf_clip(model, tmp_path / "hf")
    loaded = create_backbone("xmodal-test", pretrained=str(hf))
    assert loaded.weights_info["format"] == "hf-directory"
    assert loaded.weights_info["weights_sha256"] == hashlib.sha256((hf / "model.safetensors").read_bytes()).hexdigest()


# ---------------------------------------------------------------- module split
def test_every_old_name_is_still_importable_from_weights():
    old_public = [
        "WeightSource", "resolve_pretrained", "load_pretrained", "read_checkpoint", "hf_to_openclip", "openclip_to_hf",
        "hf_config_for", "check_hf_config", "architecture_dims", "uses_quick_gelu", "set_quick_gelu",
        "save_openclip_checkpoint", "save_hf_clip", "tag_cache_candidates", "download_allowed", "weights_not_found",
        "ACTIVATION_META", "KIND_FILE", "KIND_HF", "OPENCLIP_SAFE_NAME", "OPENCLIP_BIN_NAME", "HF_CONFIG_NAME",
        "HF_WEIGHT_NAMES", "STATE_DICT_SUFFIXES", "OPENAI_META_KEYS", "WRAPPER_PREFIXES", "EMBEDDED_TAG", "EMBEDDED",
        "hf_hub_cache_dirs",
    ]
    missing = [n for n in old_public if not hasattr(W, n)]
    assert not missing
    from xmodal.backbones import hf_model, openai, openclip_checkpoint

    assert W.hf_to_openclip is hf_model.hf_to_openclip and W.save_openclip_checkpoint is openclip_checkpoint.save_openclip_checkpoint
    assert W.OPENAI_META_KEYS is openai.OPENAI_META_KEYS
