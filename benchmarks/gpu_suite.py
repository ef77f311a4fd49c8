"""The GPU suite: every number of the README's GPU table from one command, in one JSON.

    bash benchmarks/gpu_suite.sh                  # on the GPU machine (installs missing wheels first)
    python benchmarks/gpu_suite.py --smoke        # CPU plumbing check: tiny backbone, seconds

Sections, each time-boxed (`--budget-s` is split between them; a section that finds its
share spent is recorded as skipped), the JSON rewritten atomically after each one, so a
run that is killed still leaves everything measured so far:

(a) `train_32`, `train_128`: `train_speed.py` at 32 and 128 clips x 12 frames, bf16, ViT-B/32:
    full fine-tuning vs cross_modal_adapter, mv_adapter, msta, lora, interleaved, with the
    fast-path variants (eager, fused, bf16w, graphs, ckpt, and their useful combinations) of
    `xmodal.engine.fastpath`; ratios are to eager full fine-tuning of the same run.
(b) `encode`: `encode_speed.py` on ViT-B/32 and ViT-B/16 frames: frames/s and fraction of the
    card's bf16 peak (autocast, bf16 weights, compiled, and the whole encode pipeline).
(c) `compile`: whole-tower torch.compile variants of full fine-tuning and the Cross-Modal
    Adapter (costly to compile, so last and only while budget is left).
(d) `table` (`--with-table`, off by default): the generated-world results table at its GPU
    budget, only if the remaining budget allows.

Output: `benchmarks/results/gpu_suite_<card>.json` (or `--out`).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

METHODS = ("cross_modal_adapter", "mv_adapter", "msta", "lora")

#: the train section's configurations: cross_modal_adapter gets every variant, the others the main ones
CMA_VARIANTS = ("eager", "fused", "bf16w", "bf16w+fused", "bf16w+graphs", "bf16w+fused+graphs", "bf16w+ckpt")
OTHER_VARIANTS = ("eager", "bf16w+graphs", "bf16w+ckpt")
FT_VARIANTS = ("eager", "graphs")

#: share of the total budget per section (what is left over rolls on to later sections)
SHARES = {"train_32": 0.26, "train_128": 0.30, "encode": 0.18, "compile": 0.26}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny backbone on CPU, a few seconds: plumbing only")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-clock budget of all sections together")
    p.add_argument("--sections", default="train_32,train_128,encode,compile",
                   help="comma-separated of train_32, train_128, encode, compile, table")
    p.add_argument("--with-table", action="store_true", help="also run section (d), the generated-world table")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_suite_<card>.json)")
    args = p.parse_args(argv)
    args.section_list = [s.strip() for s in args.sections.split(",") if s.strip()]
    if args.with_table and "table" not in args.section_list:
        args.section_list.append("table")
    return args


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "unknown"


def environment(device: str) -> Dict[str, Any]:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
           "cuda": torch.version.cuda, "host": platform.node()}
    try:
        import open_clip

        env["open_clip"] = open_clip.__version__
    except Exception as exc:  # recorded, the sections say what failed
        env["open_clip"] = f"unavailable: {exc}"
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["multiprocessors"] = props.multi_processor_count
    else:
        env["device_name"] = f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"
    return env


# --------------------------------------------------------------------- sections
def train_configs(smoke: bool) -> str:
    if smoke:
        return "cross_modal_adapter:eager,cross_modal_adapter:fused+bf16w,msta:bf16w+ckpt,lora:eager"
    items = [f"full_finetune:{v}" for v in FT_VARIANTS]
    items += [f"cross_modal_adapter:{v}" for v in CMA_VARIANTS]
    items += [f"{m}:{v}" for m in METHODS[1:] for v in OTHER_VARIANTS]
    return ",".join(items)


def train_section(batch: int, args, budget: float, configs: Optional[str] = None) -> Dict[str, Any]:
    import train_speed

    if args.smoke:
        argv = ["--device", "cpu", "--backbone", "xmodal-test", "--batch", "2", "--frames", "2", "--steps", "1",
                "--rounds", "1", "--warmup", "0", "--precision", "bf16", "--no-memory", "--threads", "1"]
    else:
        argv = ["--device", args.device, "--backbone", "ViT-B-32", "--batch", str(batch), "--frames", "12",
                "--steps", "4", "--rounds", "3", "--warmup", "1", "--precision", "bf16"]
    if args.smoke:  # trace without code generation: plumbing, not speed
        argv += ["--compile-backend", "aot_eager"]
    argv += ["--configs", configs or train_configs(args.smoke), "--budget-s", str(max(1.0, budget))]
    report = train_speed.measure(train_speed.parse_args(argv))
    print(train_speed.format_table(report), flush=True)
    return report


def encode_section(args, budget: float) -> Dict[str, Any]:
    import encode_speed

    out: Dict[str, Any] = {}
    start = time.perf_counter()
    backbones = ["xmodal-test"] if args.smoke else ["ViT-B-32", "ViT-B-16"]
    for i, name in enumerate(backbones):
        left = budget - (time.perf_counter() - start)
        if left <= 0:
            out[name] = {"skipped": "budget"}
            continue
        if args.smoke:
            argv = ["--device", "cpu", "--backbone", name, "--batch", "4", "--frames", "2", "--seconds", "0.2",
                    "--warmup", "1", "--variants", "autocast,bf16,pipeline", "--threads", "1"]
        else:
            variants = "autocast,bf16,bf16+compile,pipeline" if i == 0 else "autocast,bf16,pipeline"
            argv = ["--device", args.device, "--backbone", name, "--batch", "1024" if i == 0 else "512",
                    "--frames", "12", "--seconds", "3", "--variants", variants]
        argv += ["--budget-s", str(left / (len(backbones) - i))]
        report = encode_speed.measure(encode_speed.parse_args(argv))
        print(encode_speed.format_table(report), flush=True)
        out[name] = report
    return out


def compile_section(args, budget: float, out: Dict[str, Any], flush: Callable[[], None]) -> Dict[str, Any]:
    start = time.perf_counter()
    batches = [2] if args.smoke else [32, 128]
    for i, batch in enumerate(batches):
        left = budget - (time.perf_counter() - start)
        if left < (5 if args.smoke else 60):
            out[f"train_{batch}"] = {"skipped": f"budget ({left:.0f} s left)"}
            continue
        if args.smoke:
            configs = "cross_modal_adapter:bf16w+compile"
        else:
            configs = "full_finetune:compile,cross_modal_adapter:bf16w+compile"
        argv_budget = left / (len(batches) - i)
        out[f"train_{batch}"] = train_section(batch, args, argv_budget, configs)
        flush()  # a compile can outlast the budget: keep what is measured if the run is killed
    return out


def table_section(args, budget: float) -> Dict[str, Any]:
    """The generated-world table at its GPU budget, in a subprocess killed at the budget."""
    import subprocess

    cmd = [sys.executable, str(HERE / "table.py")]
    # one seed, no ablations, no speed columns (sections a-c measure speed), its own results folder
    cmd += ["--help"] if args.smoke else ["--device", args.device, "--seeds", "0", "--no-ablations", "--no-speed",
                                          "--out", str(HERE / "results" / "table_gpu"),
                                          "--work", "/tmp/xmodal_table_work"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, budget))
    except subprocess.TimeoutExpired:
        return {"skipped": f"did not finish within its budget of {budget:.0f} s (resumes next time: records kept)"}
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - t0,
            "stdout_tail": proc.stdout[-4000:], "stderr_tail": proc.stderr[-2000:]}


# ------------------------------------------------------------------------- main
def run(args) -> Dict[str, Any]:
    import torch

    from xmodal.atomic import atomic_write_json

    if args.device is None:
        args.device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if args.smoke:
        args.device = "cpu"
        torch.set_num_threads(1)
    env = environment(args.device)
    out = Path(args.out) if args.out else HERE / "results" / f"gpu_suite_{card_slug(env['device_name'])}.json"
    report: Dict[str, Any] = {"suite": "xmodal gpu_suite", "smoke": args.smoke, "environment": env,
                              "budget_s": args.budget_s, "sections": {}, "timings_s": {}, "errors": {}}
    start = time.perf_counter()
    sections: Dict[str, Callable[[float], Any]] = {
        "train_32": lambda b: train_section(32, args, b),
        "train_128": lambda b: train_section(128, args, b),
        "encode": lambda b: encode_section(args, b),
        "compile": lambda b: compile_section(args, b, report["sections"].setdefault("compile", {}),
                                             lambda: atomic_write_json(out, report)),
        "table": lambda b: table_section(args, b),
    }
    planned = [s for s in args.section_list if s in sections]
    unknown = [s for s in args.section_list if s not in sections]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; known: {', '.join(sections)}")
    for i, name in enumerate(planned):
        elapsed = time.perf_counter() - start
        left = args.budget_s - elapsed
        later = sum(SHARES.get(s, 0.1) for s in planned[i:])
        budget = left * SHARES.get(name, 0.1) / later if later else left
        if left <= 0 or budget < (0.5 if args.smoke else 20):
            report["sections"][name] = {"skipped": f"budget spent ({max(left, 0):.0f} s left)"}
        else:
            print(f"== {name}: budget {budget:.0f} s", flush=True)
            t0 = time.perf_counter()
            try:
                report["sections"][name] = sections[name](budget)
            except BaseException as exc:  # one section failing must not lose the others' numbers
                report["errors"][name] = f"{type(exc).__name__}: {exc}"
                partial = report["sections"].get(name)
                report["sections"][name] = dict(partial if isinstance(partial, dict) else {},
                                                failed=report["errors"][name], traceback=traceback.format_exc()[-3000:])
                print(f"{name} failed: {exc}", file=sys.stderr, flush=True)
                if isinstance(exc, KeyboardInterrupt):
                    raise
            report["timings_s"][name] = time.perf_counter() - t0
            if args.device == "cuda":
                torch.cuda.empty_cache()
        report["timings_s"]["total"] = time.perf_counter() - start
        atomic_write_json(out, report)  # partial results survive a kill
    report["summary"] = summary(report)
    atomic_write_json(out, report)
    print(format_summary(report["summary"]))
    print(f"wrote {out}")
    return report


def summary(report: Dict[str, Any]) -> Dict[str, Any]:
    """The README table's numbers: CMA (and the other methods) against eager full fine-tuning."""
    rows: Dict[str, Any] = {}
    for key in ("train_32", "train_128"):
        sec = report["sections"].get(key) or {}
        results = dict(sec.get("results", {}))
        comp = (report["sections"].get("compile") or {}).get(key) or {}
        for name, r in (comp.get("results", {}) if isinstance(comp, dict) else {}).items():  # same-run ratios of the compile section
            results.setdefault(f"{name} (compile run)", r)
        if not results:
            continue
        best: Dict[str, Any] = {}
        for name, r in results.items():
            method = r.get("method", name.split("[")[0])
            if method == "full_finetune":
                continue
            cur = best.get(method)
            if cur is None or r["step_time_ratio"] < cur["step_time_ratio"]:
                best[method] = {"config": name, "step_ms": r["step_ms_median"], "step_time_ratio": r["step_time_ratio"],
                                "peak_memory_ratio": r.get("peak_memory_ratio")}
        low_mem = {}
        for name, r in results.items():
            method = r.get("method", name.split("[")[0])
            if method != "full_finetune" and r.get("peak_memory_ratio") is not None:
                if method not in low_mem or r["peak_memory_ratio"] < low_mem[method]["peak_memory_ratio"]:
                    low_mem[method] = {"config": name, "peak_memory_ratio": r["peak_memory_ratio"],
                                       "step_time_ratio": r["step_time_ratio"]}
        base = next((r for n, r in results.items() if r.get("method") == "full_finetune" and r.get("variant") == "eager"),
                    None)
        rows[key] = {"full_finetune_ms": base["step_ms_median"] if base else None,
                     "fastest": best, "lowest_memory": low_mem}
    enc = {}
    for name, rep in (report["sections"].get("encode") or {}).items():
        if not isinstance(rep, dict):
            continue  # "skipped" / "failed" notes
        for v, r in (rep.get("results") or {}).items():
            enc[f"{name}/{v}"] = {"frames_per_s": r["frames_per_s"], "fraction_of_bf16_peak": r.get("fraction_of_bf16_peak")}
    rows["encode"] = enc
    return rows


def format_summary(summ: Dict[str, Any]) -> str:
    lines = []
    for key in ("train_32", "train_128"):
        row = summ.get(key)
        if not row:
            continue
        lines.append(f"{key}: full fine-tuning {row['full_finetune_ms'] or 0:.1f} ms")
        for method, b in row["fastest"].items():
            mem = b["peak_memory_ratio"]
            lines.append(f"  fastest {method:<22}{b['config']:<46} time/FT {b['step_time_ratio']:.2f}"
                         f"  mem/FT {mem:.2f}" if mem is not None else
                         f"  fastest {method:<22}{b['config']:<46} time/FT {b['step_time_ratio']:.2f}")
        for method, b in row["lowest_memory"].items():
            lines.append(f"  leanest {method:<22}{b['config']:<46} mem/FT {b['peak_memory_ratio']:.2f}"
                         f"  time/FT {b['step_time_ratio']:.2f}")
    for name, r in summ.get("encode", {}).items():
        frac = r["fraction_of_bf16_peak"]
        lines.append(f"encode {name:<28}{r['frames_per_s']:>12,.0f} frames/s"
                     + (f"  {100 * frac:.1f}% of bf16 peak" if frac is not None else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
