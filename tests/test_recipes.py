"""docs/RECIPES.md cannot rot: every ```` ```bash recipe ```` block runs, in document order, in one
scratch folder with tiny generated MSR-VTT / MSVD data in the layouts docs/DATA.md describes,
and each command exits 0. The substitutions that keep it at CPU size are the ones the doc's
"How these recipes are tested" table lists (`substitute` below); the test checks that table
and this file agree.

Also here: `xmodal eval --save-embeddings` writes what `xmodal embed` writes for the same
model and split (the same writer; features equal to float16 precision).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest

from test_docs_data import Command, blocks, commands, run_xmodal
from xmodal.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
RECIPES_MD = ROOT / "docs" / "RECIPES.md"

#: appended to every `xmodal train` of a recipe: the small test backbone on CPU, two short epochs
TINY = ["--set", "model.backbone=xmodal-test", "model.pretrained=random", "train.epochs=2", "train.batch_size=4",
        "data.num_frames=2", "data.num_workers=0", "train.device=cpu", "train.precision=fp32", "train.progress=false",
        "train.tensorboard=false", "train.log_every=1", "eval.batch_size=4", "data.unfold_captions=false"]
TEST_BACKBONE = ["--backbone", "xmodal-test", "--pretrained", "random"]
DDP_PROCESSES = "2"


# ------------------------------------------------------------------ tiny data in the documented layouts
def _video(path: Path, k: int, seconds: int = 3) -> None:
    from videos import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, num_frames=2 * seconds, fps=2, width=32, height=32, color_of=lambda i: 5 * k + i // 2)


def make_msrvtt(root: Path, n_train: int = 6, n_test: int = 4) -> Path:
    """MSR-VTT files as CLIP4Clip ships them: MSRVTT_data.json, MSRVTT_train.9k.csv, MSRVTT_JSFUSION_test.csv."""
    ann = root / "annotations"
    ann.mkdir(parents=True)
    ids = [f"video{i}" for i in range(n_train + n_test)]
    words = ["cooking", "dancing", "a car race", "a cat", "singing", "a football match", "swimming", "a lecture",
             "painting", "a dog"]
    sentences = [{"video_id": v, "caption": f"{pre} {words[i % len(words)]}", "sen_id": 2 * i + j}
                 for i, v in enumerate(ids) for j, pre in enumerate(("a video of", "people watch"))]
    videos = [{"video_id": v, "split": "train" if i < n_train else "test", "id": i} for i, v in enumerate(ids)]
    (ann / "MSRVTT_data.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv"):
        with open(ann / name, "w", newline="") as f:
            csv.writer(f).writerows([["video_id"]] + [[v] for v in ids[:n_train]])
    with open(ann / "MSRVTT_JSFUSION_test.csv", "w", newline="") as f:
        rows = [["key", "vid_key", "video_id", "sentence"]]
        rows += [[f"ret{i}", f"msr{i}", v, f"a video of {words[(n_train + i) % len(words)]}"]
                 for i, v in enumerate(ids[n_train:])]
        csv.writer(f).writerows(rows)
    for i, v in enumerate(ids):
        _video(root / "videos" / f"{v}.mp4", i)
    return root


def make_msvd(root: Path) -> Path:
    """MSVD test split as test_gt.json + test_list.txt, videos as re-encoded .mp4."""
    ann = root / "annotations"
    ann.mkdir(parents=True)
    ids = ["-4wsuPCjDBc_5_15", "0bSz70pYAP0_5_15", "1dfR0A_BXjw_590_600"]
    gt = {v: [f"a clip number {k}", f"something happens {k}"] for k, v in enumerate(ids)}
    (ann / "test_gt.json").write_text(json.dumps(gt))
    (ann / "test_list.txt").write_text("\n".join(ids) + "\n")
    for k, v in enumerate(ids):
        _video(root / "videos" / f"{v}.mp4", 20 + k)
    return root


# ------------------------------------------------------------------ substitutions (documented in RECIPES.md)
def substitute(argv: List[str]) -> List[str]:
    """The recipe command as the test runs it (see the table in RECIPES.md)."""
    argv = list(argv)
    for i in range(len(argv) - 3):
        if argv[i] == "--backbone" and argv[i + 2] == "--pretrained":
            argv[i:i + 4] = TEST_BACKBONE
    if argv[0] == "torchrun":
        argv = [DDP_PROCESSES if i and argv[i - 1] == "--nproc_per_node" else a for i, a in enumerate(argv)]
    if "train" in argv and ("xmodal" in argv[:1] or "-m" in argv):
        argv += TINY
    return argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return env


def run_torchrun(argv: List[str], cwd: Path) -> None:
    from torch.distributed.run import get_args_parser

    targs = get_args_parser().parse_args(argv[1:])
    assert targs.module and targs.training_script == "xmodal", argv
    build_parser().parse_args(targs.training_script_args)  # xmodal's own parser accepts the rest
    if targs.nnodes not in ("1", "1:1") or targs.rdzv_endpoint:
        return  # several nodes: parsed only, one machine cannot be two nodes
    cmd = [sys.executable, "-m", "torch.distributed.run", "--master_port", str(_free_port())] + argv[1:]
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"


def run_serve(argv: List[str], cwd: Path) -> None:
    import httpx

    port = str(_free_port())
    argv = [port if i and argv[i - 1] == "--port" else a for i, a in enumerate(argv)]
    proc = subprocess.Popen([sys.executable, "-m", "xmodal"] + argv[1:], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"{shlex.join(argv)} exited {proc.returncode}:\n{proc.stdout.read()[-3000:]}"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "xmodal serve did not answer /healthz within 120 s"
            time.sleep(0.5)
        (name,) = httpx.get(f"{url}/indices-list", timeout=10).json()
        found = httpx.post(f"{url}/search", json={"index": name, "query": "a video of cooking", "k": 3}, timeout=60)
        assert found.status_code == 200, found.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------ the recipes
DOC = [b for b in blocks(RECIPES_MD) if b.lang == "bash" and "recipe" in b.tags]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("recipes")
    (cwd / "configs").symlink_to(ROOT / "configs")
    make_msrvtt(cwd / "data" / "msrvtt")
    make_msvd(cwd / "data" / "msvd")
    return cwd


def test_recipes_cover_what_the_issue_asks():
    text = " ".join(str(c) for b in DOC for c in commands(b))
    for config in ("msrvtt_cross_modal_adapter_vitb32.yaml", "msrvtt_mv_adapter_vitb16.yaml",
                   "msrvtt_msta_vitb16.yaml"):
        assert f"xmodal train --config configs/{config}" in text, config
    for needed in ("xmodal eval --dataset msrvtt", "--dataset msvd", "--adapter", "--resume", "--nproc_per_node",
                   "--nnodes 2", "--rdzv-endpoint", "xmodal index", "xmodal search", "xmodal serve", "xmodal embed",
                   "--save-sims", "--save-embeddings", "--from-embeddings"):
        assert needed in text, needed


def test_the_documented_substitutions_are_the_ones_applied():
    doc = RECIPES_MD.read_text()
    table = doc[doc.index("## How these recipes are tested"):]
    assert " ".join(TEST_BACKBONE) in table and f"--nproc_per_node {DDP_PROCESSES}" in table
    assert " ".join(TINY[:6]) in table
    assert substitute(["xmodal", "eval", "--backbone", "ViT-B-32", "--pretrained", "openai"]) == \
        ["xmodal", "eval"] + TEST_BACKBONE
    ddp = substitute(["torchrun", "--nproc_per_node", "8", "-m", "xmodal", "train", "--config", "c.yaml"])
    assert ddp[:3] == ["torchrun", "--nproc_per_node", "2"] and ddp[-len(TINY):] == TINY


@pytest.mark.parametrize("index", range(len(DOC)), ids=[f"{i}-{b.section}" for i, b in enumerate(DOC)])
def test_recipe_runs(index, scratch, capsys):
    """Blocks run in document order (later recipes use the runs of earlier ones)."""
    block = DOC[index]
    for command in commands(block):
        argv = substitute(command.argv)
        if argv[0] == "torchrun":
            run_torchrun(argv, scratch)
        elif argv[:2] == ["xmodal", "serve"]:
            run_serve(argv, scratch)
        else:
            run_xmodal(Command(argv, command.expect, command.line), scratch, capsys)


def test_recipe_outputs_are_what_the_doc_says(scratch):
    """The files the recipes promise exist (runs after the recipes in file order)."""
    if not (scratch / "runs" / "msrvtt_cma" / "best").is_dir():
        pytest.skip("the recipes did not run (run the whole file)")
    for run in ("msrvtt_cma", "msrvtt_mv_adapter", "msrvtt_msta", "msrvtt_cma_resumed", "msrvtt_cma_ddp"):
        for name in ("config.yaml", "metrics.csv", "metrics.json", "last/adapter_model.safetensors",
                     "best/adapter_config.json"):
            assert (scratch / "runs" / run / name).is_file(), f"{run}/{name}"
    resumed = [r for r in csv.DictReader(open(scratch / "runs/msrvtt_cma_resumed/metrics.csv")) if r["kind"] == "step"]
    straight = [r for r in csv.DictReader(open(scratch / "runs/msrvtt_cma/metrics.csv")) if r["kind"] == "step"]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # resume = one uninterrupted run
    sims = scratch / "eval" / "msrvtt_cma_sims"
    assert np.load(sims / "sims.npy").shape == (4, 4)
    assert json.loads((sims / "metrics.json").read_text())["run"]["dataset"] == "msrvtt"
    transfer = json.loads((scratch / "eval/msrvtt_to_msvd/metrics.json").read_text())["run"]
    assert transfer["dataset"] == "msvd" and transfer["num_frames"] == 12 and transfer["adapter"]


def test_eval_save_embeddings_equals_xmodal_embed(scratch, capsys):
    """`eval --save-embeddings` and `embed` on the same model and split: same files, same numbers."""
    from xmodal.cli import main
    from xmodal.embeddings import read_embeddings

    common = ["--dataset", "msrvtt", "--root", str(scratch / "data/msrvtt"), *TEST_BACKBONE, "--seed", "3",
              "--num-frames", "3", "--batch-size", "3", "--num-workers", "0", "--device", "cpu"]
    emb_eval, emb_embed = scratch / "cmp_eval", scratch / "cmp_embed"
    assert main(["eval", *common, "--save-embeddings", str(emb_eval), "--out", str(scratch / "cmp_metrics")]) == 0
    assert main(["embed", *common, "--out", str(emb_embed)]) == 0
    a, b = read_embeddings(emb_eval), read_embeddings(emb_embed)
    assert a.provenance == b.provenance  # same model, data, frames: same provenance id
    assert a.ids == b.ids == [f"video{i}" for i in range(6, 10)] and a.captions == b.captions
    assert np.allclose(a.visual.astype(np.float32), b.visual.astype(np.float32), atol=2e-3)
    assert np.allclose(a.text.astype(np.float32), b.text.astype(np.float32), atol=2e-3)
    assert np.allclose(a.frames.float().numpy(), b.frames.float().numpy(), atol=2e-3) and bool((a.mask == b.mask).all())
    # a built index over them answers queries
    assert main(["index", "--from-embeddings", str(emb_eval), "--out", str(scratch / "cmp_index")]) == 0
    capsys.readouterr()


def test_save_embeddings_refuses_a_folder_of_another_run(scratch, capsys):
    from xmodal.cli import main

    common = ["--dataset", "msrvtt", "--root", str(scratch / "data/msrvtt"), *TEST_BACKBONE, "--num-frames", "2",
              "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--out", str(scratch / "refuse_metrics")]
    folder = scratch / "refuse"
    assert main(["eval", *common, "--seed", "1", "--save-embeddings", str(folder)]) == 0
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert main(["eval", *common, "--seed", "2", "--save-embeddings", str(folder)]) == 2
    assert "holds embeddings of another run" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
