"""`make demo` over several training seeds: does the adapter beat zero-shot by more than the seed spread?

    python benchmarks/demo_seeds.py                      # seeds 0,1,2 -> benchmarks/results/demo_seeds.json
    python benchmarks/demo_seeds.py --seeds 0,1 --set train.epochs=4

Runs `xmodal demo` once per seed (`--set train.seed=K`, everything else the demo's defaults plus any
`--set`), each in its own folder under --work; the generated world is made by the first run and
reused by the others (it does not depend on the training seed; `xmodal demo` checks its marker).
Zero-shot is the same in every run (checked). For every main-set metric it reports the adapted
value per seed, the spread (max - min over seeds), the smallest gain over zero-shot (for MdR/MnR a
gain is a decrease) and whether that smallest gain exceeds the spread; the same for the order
subset, which is reported but not part of the verdict. Wall time of each demo run is recorded
(the first includes generating the world). Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = [f"{d}/{m}" for d in ("t2v", "v2t") for m in ("R@1", "R@5", "R@10", "MdR", "MnR")]
LOWER_IS_BETTER = ("MdR", "MnR")


def gains(zero: dict, runs: list) -> dict:
    """Per metric: per-seed values, spread, smallest gain over zero-shot, and gain > spread."""
    out = {}
    for m in METRICS:
        vals = [r[m] for r in runs]
        sign = -1.0 if m.endswith(LOWER_IS_BETTER) else 1.0
        g = [sign * (v - zero[m]) for v in vals]
        spread = max(vals) - min(vals)
        out[m] = {"zero_shot": zero[m], "adapted": vals, "spread": round(spread, 4), "min_gain": round(min(g), 4),
                  "gain_exceeds_spread": min(g) > spread}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--work", default="demo_seeds_work", help="one demo folder per seed (+ the shared world)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "demo_seeds.json"))
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    xmodal = Path(sys.executable).with_name("xmodal")
    runs, seconds = [], []
    for i, seed in enumerate(seeds):
        out = work / f"seed{seed}"
        out.mkdir(exist_ok=True)
        data = out / "data"
        if i > 0 and not data.exists():
            data.symlink_to(work / f"seed{seeds[0]}" / "data", target_is_directory=True)
        cmd = [str(xmodal), "demo", "--out", str(out), "--set", f"train.seed={seed}",
               *[x for kv in args.overrides for x in ("--set", kv)]]
        print("$ " + " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds.append(round(time.time() - t0, 1))
        if rc.returncode != 0:
            print(rc.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"demo with seed {seed} failed (exit {rc.returncode})")
        runs.append(json.loads((out / "demo_summary.json").read_text()))
        print(f"  seed {seed}: {seconds[-1]} s", flush=True)
    train = runs[0].get("train")
    if train is None or any(r.get("train") != train for r in runs):
        raise SystemExit("the demos' summaries do not all name the same training settings ('train')")
    zero = runs[0]["zero_shot"]
    if any(abs(r["zero_shot"][m] - zero[m]) > 1e-9 for r in runs for m in METRICS):
        raise SystemExit("zero-shot differs between runs: the world or the weights changed between seeds")
    main_set = gains(zero, [r["adapted"] for r in runs])
    order = None
    if all(r.get("order_subset") for r in runs):
        order = gains(runs[0]["order_subset"]["zero_shot"], [r["order_subset"]["adapted"] for r in runs])
    result = {
        "command": "python benchmarks/demo_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d', time.gmtime())}",
        "seeds": seeds, "overrides": args.overrides, "seconds": seconds,
        "first_run_includes_world": True, "world": runs[0].get("world"), "train": train,
        "method": runs[0]["method"], "trainable": runs[0]["trainable"],
        "run": runs[0].get("run"), "main": main_set, "order_subset": order,
        "verdict": all(v["gain_exceeds_spread"] for v in main_set.values()),
    }
    from xmodal.atomic import atomic_write_json

    atomic_write_json(args.out, result)
    print(format_table(result))
    return 0


def format_table(result: dict) -> str:
    lines = [f"seeds {result['seeds']}, demo wall time {result['seconds']} s (the first generates the world)",
             f"{'metric':<10}{'zero-shot':>10}  {'adapted per seed':<22}{'spread':>8}{'min gain':>10}  gain > spread"]
    for title, block in (("main test set", result["main"]), ("order subset (not in the verdict)",
                                                             result["order_subset"] or {})):
        lines.append(title)
        for m, v in block.items():
            seeds = " / ".join(f"{x:.1f}" for x in v["adapted"])
            lines.append(f"{m:<10}{v['zero_shot']:>10.1f}  {seeds:<22}{v['spread']:>8.1f}{v['min_gain']:>10.1f}  "
                         f"{'yes' if v['gain_exceeds_spread'] else 'NO'}")
    lines.append(f"verdict: adapted ahead of zero-shot by more than the seed spread on every main-set metric: "
                 f"{'yes' if result['verdict'] else 'NO'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
