"""Two-stage search at 100k and 1M videos: FAISS candidates + exact text-conditioned re-rank.

    python benchmarks/search_speed.py                       # 100k and 1M videos, 100 queries
    python benchmarks/search_speed.py --sizes 100000 --queries 50

What is measured. A gallery of N videos x 12 frames (float16, as `xmodal index` stores it) is
searched with text queries the way `GalleryIndex.search` does it, with one of two first stages:
  - top-K: FAISS finds K candidates (K in --candidates) over the L2-normalised mean-pooled videos or
    over every frame (a video scores its best frame), for each index in --configs;
  - lists (`probe=P` in --configs, IVF indices): every video with a frame in P IVF lists (those
    holding the query's best-matching frames, then those of its nearest centroids; with P >= nprobe
    simply the P nearest) is a candidate (`xmodal.ivf_lists`); K is then the mean number of videos
    re-ranked;
then the candidates are re-scored exactly with text-conditioned pooling (tau = 5, the head's
default; Gram matrices cached beforehand, as `xmodal serve` does on load), top 10 kept. The
reference is the exact text-conditioned score of EVERY video for every query, computed once per
query set in chunks of 16384 videos. Reported per (index, K): p50 / p99
latency of one query at a time (FAISS + re-rank; text encoding is measured separately) on
--threads CPU threads, and recall@10 = |two-stage top-10 & exact top-10| / 10, averaged over queries.

Where the features come from. Random isotropic vectors make this benchmark meaningless (on them
two-stage recall@10 is already 1.000 at K=50 on 100k videos). So the gallery is grown from features
the model really produces: `xmodal synth videos` writes a small world (320 clips, cached under
.xmodal_cache/search_speed/), every clip is encoded ONCE with xmodal-tiny (--pretrained xmodal,
12 frames at 2 fps) and cached; then each of the N gallery videos is made from those real frame
features by
  1. recombination: the first s frames (s uniform in 3..9) come from one real clip and the rest from
     another (the world's clips are ordered events, so this makes new event pairs), frames
     re-timed by a sorted resample;
  2. anisotropic perturbation: a per-video offset and per-frame noise drawn from N(0, Sigma) with
     Sigma the covariance of the real frame features (its top 64 principal directions), scaled to
     --video-noise / --frame-noise of the real spread, so the gallery keeps the real anisotropy;
  3. near-duplicates: --dup-frac of the videos are copies of an earlier gallery video with
     1/10 of the noise (re-uploads, re-encodes).
With 320 real clips and 1M videos every clip has thousands of perturbed relatives, so the exact
top-10 of a query is a crowd of near-duplicates: the hard case for a candidate stage.
Queries are captions of the real clips (--queries of them, seeded), encoded with the same model.

Memory: 1M x 12 x 256 float16 = 5.7 GiB of frames + 1 GiB of pooled float32 vectors + the FAISS
index; exact scoring never holds more than one chunk in float32.
Writes benchmarks/results/search_speed.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".xmodal_cache" / "search_speed"
RESULT = ROOT / "benchmarks" / "results" / "search_speed.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--candidates", type=int, nargs="+", default=[50, 200, 1000])
    p.add_argument("--configs", nargs="+", default=[
        "mean/Flat", "mean/HNSW32/efSearch=auto", "mean/IVF1024,PQ32/nprobe=32",
        "frames/Flat", "frames/IVF1024,PQ64/nprobe=32|nprobe=32+probe=8|nprobe=32+probe=16|nprobe=32+probe=32"],
        help="VECTORS/FACTORY[/PARAMS[|PARAMS...]]: candidate vectors (mean-pooled or every frame), FAISS factory "
             "string, search parameter sets tried on the same index (efSearch=auto: max(64, vectors fetched); "
             "probe=P: whole IVF lists instead of a top-K, e.g. nprobe=128+probe=128)")
    p.add_argument("--train-size", type=int, default=65536, help="IVF/PQ training sample")
    p.add_argument("--clips", type=int, default=320, help="real clips generated and encoded")
    p.add_argument("--threads", type=int, default=2, help="threads of the offline parts (gallery, exact scores, builds)")
    p.add_argument("--query-threads", type=int, default=2, help="threads while timing one query at a time")
    p.add_argument("--max-flat-frames", type=int, default=2_000_000,
                   help="skip frames/Flat above this many frame vectors (float32 copy of every frame)")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--video-noise", type=float, default=0.35)
    p.add_argument("--frame-noise", type=float, default=0.15)
    p.add_argument("--dup-frac", type=float, default=0.2)
    p.add_argument("--exact-timing-queries", type=int, default=3,
                   help="queries timed for the one-query exact scan of every video")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mmap-above", type=int, default=500_000,
                   help="galleries this large are grown into a memory-mapped .npy under .xmodal_cache (deleted after)")
    p.add_argument("--out", default=str(RESULT))
    p.add_argument("--append", action="store_true",
                   help="add this run's sizes to --out (each size record keeps its own settings)")
    return p.parse_args(argv)


# ------------------------------------------------------------------ real features
def real_features(args) -> Dict[str, Any]:
    """Frame features of the generated world's clips and their captions' text features (cached)."""
    import torch
    from safetensors.torch import load_file, save_file

    from xmodal.atomic import atomic_file, ensure_dir

    cache = CACHE / f"xmodal-tiny_{args.clips}clips_{args.frames}f.safetensors"
    captions_file = cache.with_suffix(".captions.json")
    if cache.is_file() and captions_file.is_file():
        t = load_file(str(cache))
        return {"frames": t["frames"], "mask": t["mask"].bool(), "text": t["text"],
                "captions": json.loads(captions_file.read_text())}
    from torch.utils.data import DataLoader

    from xmodal.backbones.factory import create_backbone
    from xmodal.data import VisualLoader, read_dataset
    from xmodal.data.dataset import VisualDataset, collate
    from xmodal.data.media import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, clip_transform
    from xmodal.encoding import encode_loader, encode_texts
    from xmodal.methods import AdaptedModel
    from xmodal.synth.world import write_video_set

    world = CACHE / "world"
    if not (world / "train.jsonl").is_file():
        print(f"generating {args.clips} clips under {world} ...", flush=True)
        write_video_set(world, n=args.clips, n_test=args.clips // 4, seed=args.seed, progress=False)
    items = [it for split in ("train", "test") for it in read_dataset("jsonl", str(world), split).items]
    items = items[: args.clips]
    model = AdaptedModel(create_backbone("xmodal-tiny", "xmodal"))
    load = VisualLoader(clip_transform(model.backbone.image_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD), fps=2.0)
    loader = DataLoader(VisualDataset(items, load, args.frames, strict=True), batch_size=16, collate_fn=collate)
    t0 = time.perf_counter()
    frames, mask = encode_loader(model, loader, progress=False)
    captions = [c for it in items for c in it.captions]
    text = encode_texts(model, captions, progress=False)
    print(f"encoded {len(items)} clips ({mask.float().sum(1).mean():.1f} real frames each) and {len(captions)} "
          f"captions in {time.perf_counter() - t0:.1f} s", flush=True)
    ensure_dir(CACHE)
    with atomic_file(cache) as tmp:
        save_file({"frames": frames.contiguous(), "mask": mask.to(torch.uint8), "text": text.contiguous()}, str(tmp))
    from xmodal.atomic import atomic_write_json

    atomic_write_json(captions_file, captions)
    return {"frames": frames, "mask": mask, "text": text, "captions": captions}


def grow_gallery(real, n: int, args) -> np.ndarray:
    """(n, F, D) float16 frame features recombined and perturbed from the real ones (see module doc)."""
    rng = np.random.default_rng(args.seed + n)
    base = real["frames"].numpy().astype(np.float32)  # (C, F, D)
    c, f, d = base.shape
    flat = base.reshape(-1, d)
    mean = flat.mean(0)
    u, s, vt = np.linalg.svd(flat - mean, full_matrices=False)
    r = min(64, len(s))
    # noise ~ N(0, Sigma_r): z @ (diag(s/sqrt(n)) V^T) keeps the real anisotropy
    basis = (s[:r, None] / np.sqrt(len(flat))) * vt[:r]  # (r, D)
    if n >= args.mmap_above:  # file-backed pages: the kernel can write them out instead of failing
        CACHE.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(CACHE / f"gallery_{n}.npy", mode="w+", dtype=np.float16, shape=(n, f, d))
    else:
        out = np.empty((n, f, d), dtype=np.float16)
    step = 32768
    for start in range(0, n, step):
        m = min(step, n - start)
        a, b = rng.integers(c, size=m), rng.integers(c, size=m)
        split = rng.integers(3, 10, size=m)
        src_t = np.sort(rng.integers(0, f, size=(m, f)), axis=1)  # re-timing, order kept
        take_b = np.arange(f)[None, :] >= split[:, None]
        clip = np.where(take_b, b[:, None], a[:, None])
        x = base[clip, src_t]  # (m, F, D)
        x += ((rng.standard_normal((m, r), dtype=np.float32) * args.video_noise) @ basis)[:, None, :]
        x += ((rng.standard_normal((m * f, r), dtype=np.float32) * args.frame_noise) @ basis).reshape(m, f, d)
        out[start:start + m] = x
    n_dup = int(args.dup_frac * n)
    dst = rng.choice(np.arange(1, n), size=n_dup, replace=False)
    for start in range(0, n_dup, step):
        rows = dst[start:start + step]
        src = (rng.random(len(rows)) * rows).astype(np.int64)  # an earlier video
        noise = ((rng.standard_normal((len(rows) * f, r), dtype=np.float32) * args.frame_noise * 0.1) @ basis
                 ).reshape(len(rows), f, d)
        out[rows] = (out[src].astype(np.float32) + noise).astype(np.float16)
    return out


# ------------------------------------------------------------------ measurement
def percentile(xs: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def run_size(n: int, real, queries, args, log) -> Dict[str, Any]:
    import torch

    from xmodal.engine.heads import SimilarityHead
    from xmodal.retrieval_index import GalleryIndex

    t0 = time.perf_counter()
    feats = grow_gallery(real, n, args)
    mask = torch.ones(n, args.frames, dtype=torch.bool)
    t_grow = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = GalleryIndex(torch.from_numpy(feats), mask, [str(i) for i in range(n)], [""] * n,
                        faiss_factory="Flat", candidate_vectors="mean", check=True)
    pooled = base.pooled
    t_flat = time.perf_counter() - t0
    head = SimilarityHead("text_conditioned", temperature=5.0)
    log(f"[{n}] gallery grown in {t_grow:.0f} s, checked + pooled + Flat in {t_flat:.0f} s; exact scoring ...")
    t0 = time.perf_counter()
    exact = base.score_all(queries, head)  # (Q, N), the ground truth
    t_exact = time.perf_counter() - t0
    truth = torch.topk(exact, 10, dim=1).indices.numpy()
    log(f"[{n}] exact text-conditioned scores of {n} videos x {len(queries)} queries in {t_exact:.0f} s")
    # one-query exact scan (what `--exact` costs per request)
    torch.set_num_threads(args.query_threads)
    scan = []
    for q in range(min(args.exact_timing_queries, len(queries))):
        t = time.perf_counter()
        base.search(queries[q:q + 1], k=10, rerank=head, exact=True)
        scan.append(time.perf_counter() - t)
    record: Dict[str, Any] = {
        "videos": n, "frames": args.frames, "dim": int(feats.shape[2]), "queries": len(queries),
        "exact_all_queries_s": round(t_exact, 2), "exact_one_query_ms_p50": round(1000 * statistics.median(scan), 1),
        "grow_s": round(t_grow, 1), "runs": []}
    import faiss

    for config in args.configs:
        vectors, factory, *rest = config.split("/")
        settings = rest[0].split("|") if rest else [""]
        if (vectors, factory) == ("frames", "Flat") and n * args.frames > args.max_flat_frames:
            log(f"[{n}] {config}: skipped ({n * args.frames} frame vectors > --max-flat-frames)")
            continue
        t0 = time.perf_counter()
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
        try:
            if (vectors, factory) == ("mean", "Flat"):
                gi = GalleryIndex(base.frame_features, mask, base.ids, base.media, faiss_index=base.faiss,
                                  candidate_vectors="mean", check=False)
                t_build = t_flat
            else:
                gi = GalleryIndex(base.frame_features, mask, base.ids, base.media, candidate_vectors=vectors,
                                  faiss_factory=factory, faiss_train_size=args.train_size, check=False, seed=args.seed)
                t_build = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - reported, the other configurations still run
            log(f"[{n}] {config}: {exc}")
            record["runs"].append({"vectors": vectors, "factory": factory, "error": str(exc)})
            continue
        log(f"[{n}] {vectors}/{factory} built in {t_build:.0f} s")
        torch.set_num_threads(args.query_threads)
        faiss.omp_set_num_threads(args.query_threads)
        gi.prepare(head)  # the Gram matrices every re-rank reads, computed before timing (as `xmodal serve` does)
        plan = []
        for setting in settings:  # e.g. nprobe=128+probe=128: FAISS parameters + lists read whole
            parts = setting.split("+")
            probe = next((int(x.split("=", 1)[1]) for x in parts if x.startswith("probe=")), None)
            params = ",".join(x for x in parts if x and not x.startswith("probe="))
            plan += [(setting, params, probe, k) for k in ([None] if probe else args.candidates)]
        for setting, params, probe, k in plan:
            if setting.startswith("efSearch=auto"):
                fetched = k * (gi.frame_oversample if vectors == "frames" else 1)
                params = f"efSearch={max(64, fetched)}"
            if params:
                faiss.ParameterSpace().set_index_parameters(gi.faiss, params)
            kw = {"probe": probe} if probe else {"candidates": k}
            gi.search(queries[:1], k=10, rerank=head, **kw)  # warm-up (reads the lists' members once)
            times, recalls, counts = [], [], []
            for q in range(len(queries)):
                t, stats = time.perf_counter(), {}
                hits = gi.search(queries[q:q + 1], k=10, rerank=head, stats=stats, **kw)[0]
                times.append(time.perf_counter() - t)
                recalls.append(len({h.row for h in hits} & set(truth[q].tolist())) / 10)
                counts.append(stats["candidates"][0])
            run = {"vectors": vectors, "factory": factory, "params": setting if probe else params,
                   "K": int(np.mean(counts)) if probe else k, "build_s": round(t_build, 1),
                   "p50_ms": round(1000 * percentile(times, 50), 2), "p99_ms": round(1000 * percentile(times, 99), 2),
                   "recall@10": round(float(np.mean(recalls)), 4), "recall@10_min": round(float(np.min(recalls)), 2)}
            if probe:
                run["candidates"] = "lists"
                run["K_max"] = int(np.max(counts))
            record["runs"].append(run)
            log(f"[{n}] {vectors:6s} {factory:16s} {run['params']:14s} K={run['K']:6d}  p50 {run['p50_ms']:8.2f} ms  "
                f"p99 {run['p99_ms']:8.2f} ms  recall@10 {run['recall@10']:.3f} (min {run['recall@10_min']:.1f})")
        del gi
    (CACHE / f"gallery_{n}.npy").unlink(missing_ok=True)
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import faiss
    import torch

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT / "src"))

    def log(msg: str) -> None:
        print(msg, flush=True)

    real = real_features(args)
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(real["captions"]), size=min(args.queries, len(real["captions"])), replace=False)
    queries = real["text"][torch.as_tensor(pick)]
    from xmodal.backbones.factory import create_backbone
    from xmodal.encoding import encode_texts
    from xmodal.methods import AdaptedModel

    model = AdaptedModel(create_backbone("xmodal-tiny", "xmodal"))
    enc = []
    for i in pick[:20]:
        t = time.perf_counter()
        encode_texts(model, [real["captions"][int(i)]], progress=False)
        enc.append(time.perf_counter() - t)
    del model
    result: Dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs; "
                   f"{args.query_threads} thread(s) per query, {args.threads} offline",
        "model": "xmodal-tiny --pretrained xmodal", "clips": args.clips, "head": "text_conditioned tau=5",
        "text_encode_ms_p50": round(1000 * statistics.median(enc), 2),
        "sizes": []}
    out = Path(args.out)
    if args.append and out.is_file():
        result = json.loads(out.read_text())
    from xmodal.atomic import atomic_write_json

    for n in args.sizes:
        load = os.getloadavg()[0]
        result["sizes"].append(run_size(n, real, queries, args, log))
        result["sizes"][-1]["settings"] = {k: v for k, v in vars(args).items() if k not in ("out", "append")}
        result["sizes"][-1]["loadavg_1min"] = [round(load, 1), round(os.getloadavg()[0], 1)]
        atomic_write_json(out, result)  # partial results survive an interrupted 1M run
    print_table(result)
    print(f"wrote {out}")
    return 0


def print_table(result: Dict[str, Any]) -> None:
    print(f"\n{result['machine']}; text encoding p50 {result['text_encode_ms_p50']} ms (not included below)")
    print(f"{'videos':>9} {'vectors':7} {'index':16} {'params':14} {'K':>6} {'p50 ms':>9} {'p99 ms':>9} {'R@10':>6}"
          "   (probe=P rows: K = mean videos re-ranked)")
    for size in result["sizes"]:
        for r in size["runs"]:
            if "error" in r:
                print(f"{size['videos']:>9} {r['vectors']:7} {r['factory']:16} error: {r['error']}")
                continue
            print(f"{size['videos']:>9} {r['vectors']:7} {r['factory']:16} {r['params']:14} {r['K']:>6} "
                  f"{r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f} {r['recall@10']:>6.3f}")
        print(f"{size['videos']:>9} {'-':7} {'exact scan':16} {'':14} {'all':>6} {size['exact_one_query_ms_p50']:>9.1f} "
              f"{'':>9} {1.0:>6.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
