"""`xmodal embed` (clip-retrieval layout, sharded over torch.distributed) and `index --from-embeddings`."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.videos import write_video
from xmodal.cli import main
from xmodal.embeddings import file_sha256, read_embeddings, shard_rows, weights_provenance
from xmodal.retrieval_index import GalleryIndex

REPO = Path(__file__).resolve().parents[1]
N = 7


@pytest.fixture(scope="module")
def video_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    lines = []
    for i in range(N):
        write_video(root / f"v{i}.mp4", num_frames=3, fps=1, width=40, height=32, codec="mpeg4",
                    color_of=lambda t, i=i: (7 * i + 3 * t) % 64)
        lines.append(json.dumps({"id": f"v{i}", "video": f"v{i}.mp4", "captions": [f"clip {i}", f"video {i}"]}))
    (root / "test.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _args(root, *extra):
    return ["--dataset", "jsonl", "--root", str(root), "--split", "test", "--backbone", "xmodal-test",
            "--pretrained", "random", "--seed", "1", "--num-frames", "3", "--num-workers", "0", "--batch-size", "2",
            *extra]


def _arrays(folder):
    emb = read_embeddings(folder)
    return emb, {"frames": emb.frames.numpy(), "mask": emb.mask.numpy(), "visual": emb.visual, "text": emb.text}


@pytest.fixture(scope="module")
def single(video_set, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "single"
    assert main(["embed", *_args(video_set), "--out", str(out)]) == 0
    return out


def test_single_process_writes_the_clip_retrieval_layout(single):
    names = sorted(str(p.relative_to(single)) for p in single.rglob("*") if p.is_file())
    assert names == ["embeddings.json", "frame_emb/frame_emb_0.npy", "frame_mask/frame_mask_0.npy",
                     "metadata/metadata_0.parquet", "shards/shard_0.json", "text_emb/text_emb_0.npy",
                     "video_emb/video_emb_0.npy"]
    video = np.load(single / "video_emb" / "video_emb_0.npy", allow_pickle=False)
    text = np.load(single / "text_emb" / "text_emb_0.npy", allow_pickle=False)
    frames = np.load(single / "frame_emb" / "frame_emb_0.npy", allow_pickle=False)
    assert video.dtype == text.dtype == frames.dtype == np.float16
    assert video.shape == text.shape == (N, 32) and frames.shape == (N, 3, 32)
    assert np.allclose(np.linalg.norm(video.astype(np.float32), axis=1), 1, atol=2e-3)
    meta = pq.read_table(single / "metadata" / "metadata_0.parquet").to_pydict()
    assert meta["id"] == [f"v{i}" for i in range(N)] and meta["caption"][2] == "clip 2"
    assert meta["captions"][2] == ["clip 2", "video 2"] and meta["image_path"][0].endswith("v0.mp4")
    prov = json.loads((single / "embeddings.json").read_text())
    assert prov["layout"] == "clip-retrieval" and prov["partition_count"] == 1 and prov["num_frames"] == 3
    assert prov["backbone"] == "xmodal-test" and prov["dim"] == 32 and prov["kind"] == "video"


def test_weights_provenance_is_the_sha256_of_the_file_read():
    from xmodal.backbones.weights import EMBEDDED

    rec = weights_provenance("xmodal-tiny", "xmodal")
    assert rec["weights_sha256"] == file_sha256(EMBEDDED["xmodal-tiny"]) and len(rec["weights_sha256"]) == 64


def test_shards_cut_on_batch_boundaries_cover_everything():
    for n, world, bs in [(7, 2, 2), (100, 3, 16), (5, 4, 8), (1, 2, 1)]:
        parts = [shard_rows(n, r, world, bs) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))
        assert all(p.start % bs == 0 for p in parts if len(p))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_the_single_process_result(video_set, single, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"),
                                                                                os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "xmodal", "embed", *_args(video_set), "--device", "cpu",
           "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "video_emb").iterdir()) == ["video_emb_0.npy", "video_emb_1.npy"]
    assert [json.loads((out / "shards" / f"shard_{r}.json").read_text())["rows"] for r in (0, 1)] == [4, 3]
    emb2, got = _arrays(out)
    emb1, want = _arrays(single)
    assert emb2.ids == emb1.ids and emb2.captions == emb1.captions
    for key in want:
        assert np.array_equal(got[key], want[key]), key  # bit-identical, not just close


def test_shard_flag_then_index_from_embeddings(video_set, single, tmp_path, capsys):
    out = tmp_path / "sharded"
    for r in (1, 0):
        assert main(["embed", *_args(video_set), "--shard", f"{r}/2", "--out", str(out)]) == 0
    _, got = _arrays(out)
    _, want = _arrays(single)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    # an index from the shards equals one encoded directly
    assert main(["index", "--from-embeddings", str(out), "--out", str(tmp_path / "idx_emb")]) == 0
    assert main(["index", *_args(video_set), "--out", str(tmp_path / "idx_direct")]) == 0
    a, b = GalleryIndex.load(tmp_path / "idx_emb"), GalleryIndex.load(tmp_path / "idx_direct")
    assert a.ids == b.ids and a.captions == b.captions == [[f"clip {i}", f"video {i}"] for i in range(N)]
    assert np.array_equal(a.frame_features.numpy(), b.frame_features.numpy())
    assert a.meta["head"] == b.meta["head"] and a.meta["source_embeddings"]["path"] == str(out.resolve())
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx_emb"), "clip 3", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert len(hits) == 3 and len({h["id"] for h in hits}) == 3


def test_incomplete_or_mixed_embedding_folders_are_refused(video_set, tmp_path, capsys):
    out = tmp_path / "part"
    assert main(["embed", *_args(video_set), "--shard", "0/2", "--out", str(out)]) == 0
    assert main(["index", "--from-embeddings", str(out), "--out", str(tmp_path / "i")]) == 2
    assert "partition 1 of 2 is missing" in capsys.readouterr().err
    # another run (different frame count) into the same folder
    args = _args(video_set)
    args[args.index("--num-frames") + 1] = "2"
    assert main(["embed", *args, "--shard", "1/2", "--out", str(out)]) == 2
    assert "holds embeddings of another run" in capsys.readouterr().err
    assert main(["index", "--from-embeddings", str(out), "--backbone", "xmodal-test", "--out",
                 str(tmp_path / "i")]) == 2
    assert "drop ['--backbone']" in capsys.readouterr().err


def test_missing_media_in_a_shard_is_an_error_or_recorded(video_set, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(N):
        if i != 5:
            (root / f"v{i}.mp4").write_bytes((video_set / f"v{i}.mp4").read_bytes())
    (root / "test.jsonl").write_text((video_set / "test.jsonl").read_text())
    assert main(["embed", *_args(root), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "1 of 7 items have missing or unreadable media" in err and "v5.mp4" in err
    assert main(["embed", *_args(root), "--allow-missing", "--out", str(tmp_path / "e")]) == 0
    emb = read_embeddings(tmp_path / "e")
    assert emb.partial and [d["id"] for d in emb.dropped] == ["v5"] and "v5" not in emb.ids and len(emb.ids) == 6
    assert main(["index", "--from-embeddings", str(tmp_path / "e"), "--out", str(tmp_path / "i")]) == 0
    assert GalleryIndex.load(tmp_path / "i").partial
