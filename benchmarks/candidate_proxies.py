"""How well does each candidate score predict the exact text-conditioned ranking? (no FAISS error)

    python benchmarks/candidate_proxies.py                  # 100k videos, 30 queries
    python benchmarks/candidate_proxies.py --items 20000 --queries 20

Two-stage search can only be as good as its first-stage score. This script takes the gallery of
`search_speed.py` (same growth from real xmodal-tiny features, same seed), computes the exact
text-conditioned score of every video for `--queries` queries, and for each candidate score, scanned
EXACTLY over the whole gallery (so no index approximation enters), reports recall@10 of its top-K
against the exact top-10:

- `max_cos`: the best frame's cosine (what `--candidate-vectors frames` indexes);
- `max_dot`: the best frame's raw inner product (the frame the pooling weights most);
- `cos_of_top_frame`: the cosine of that frame;
- `mean_cos`: cosine with the mean-pooled vector (`--candidate-vectors mean`);
- `top2_cos_mean`: mean of the two best frame cosines;
- `self_pooled_cos`: per frame j, the frames pooled with query-free weights softmax(<f_j, f_i> |t| / (|f_j| tau))
  (the weights the head would give if the query were f_j), best cosine over j.

Writes benchmarks/results/candidate_proxies.json and prints a table. Recall here is an upper bound
for a FAISS index over the same vectors at the same K.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KS = (50, 200, 1000, 5000, 20000)


def main(argv=None) -> int:
    import search_speed as ss

    from xmodal.retrieval_index import text_conditioned_scores

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "candidate_proxies.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sargs = ss.parse_args(["--sizes", str(args.items)])
    t0 = time.perf_counter()
    real = ss.real_features(sargs)
    feats = torch.from_numpy(np.asarray(ss.grow_gallery(real, args.items, sargs))).float()  # (N, F, D)
    n = feats.shape[0]
    g = torch.Generator().manual_seed(0)
    q_rows = torch.randperm(len(real["text"]), generator=g)[: args.queries]
    text = real["text"][q_rows].float()
    unit_t = torch.nn.functional.normalize(text, dim=-1)
    tau, chunk = 5.0, 8192
    ks = [k for k in KS if k < n]
    proxies = {name: torch.empty(len(text), n) for name in
               ("max_cos", "max_dot", "cos_of_top_frame", "mean_cos", "top2_cos_mean", "self_pooled_cos")}
    exact = torch.empty(len(text), n)
    t_norm = text.norm(dim=-1).mean()
    with torch.no_grad():
        for a in range(0, n, chunk):
            f = feats[a:a + chunk]
            exact[:, a:a + chunk] = text_conditioned_scores(text, f, None, tau, False)
            fn = torch.nn.functional.normalize(f, dim=-1)
            dot = torch.einsum("qd,vfd->qvf", text, f)
            cos = torch.einsum("qd,vfd->qvf", unit_t, fn)
            proxies["max_cos"][:, a:a + chunk] = cos.max(-1).values
            proxies["max_dot"][:, a:a + chunk] = dot.max(-1).values
            proxies["cos_of_top_frame"][:, a:a + chunk] = torch.gather(cos, 2, dot.argmax(-1, keepdim=True))[..., 0]
            proxies["mean_cos"][:, a:a + chunk] = unit_t @ torch.nn.functional.normalize(f.mean(1), dim=-1).t()
            proxies["top2_cos_mean"][:, a:a + chunk] = cos.topk(2, dim=-1).values.mean(-1)
            gram = torch.bmm(f, f.transpose(1, 2))
            w = (gram * (t_norm / f.norm(dim=-1)[:, :, None]) / tau).softmax(-1)
            pooled = torch.nn.functional.normalize(torch.bmm(w, f), dim=-1)
            proxies["self_pooled_cos"][:, a:a + chunk] = torch.einsum("qd,vfd->qvf", unit_t, pooled).max(-1).values
    truth = [set(r.tolist()) for r in torch.topk(exact, 10, dim=1).indices]
    table = {}
    for name, score in proxies.items():
        table[name] = {}
        for k in ks:
            top = torch.topk(score, k, dim=1).indices
            table[name][str(k)] = round(float(np.mean([len(truth[q] & set(top[q].tolist())) / 10
                                                       for q in range(len(text))])), 4)
    result = {
        "command": "python benchmarks/candidate_proxies.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {args.threads}, "
                   f"{time.strftime('%Y-%m-%d', time.gmtime())}",
        "model": "xmodal-tiny --pretrained xmodal (features and queries from benchmarks/search_speed.py's cache)",
        "gallery": {"videos": n, "frames": int(feats.shape[1]), "how": "benchmarks/search_speed.py grow_gallery, seed 0"},
        "queries": len(text), "tau": tau, "recall@10_of_top_K": table, "seconds": round(time.perf_counter() - t0, 1),
    }
    from xmodal.atomic import atomic_write_json

    atomic_write_json(args.out, result)
    print(f"{n} videos, {len(text)} queries: recall@10 of the exact top-K by each candidate score")
    print(f"{'score':<18}" + "".join(f"{'K=' + str(k):>10}" for k in ks))
    for name, row in table.items():
        print(f"{name:<18}" + "".join(f"{row[str(k)]:>10.3f}" for k in ks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
