"""Gallery encoding throughput: frames/s and the fraction of the card's bf16 peak it reaches.

    python benchmarks/encode_speed.py --backbone ViT-B-32 --batch 1024 --seconds 10
    python benchmarks/encode_speed.py --device cpu --backbone xmodal-tiny --batch 16 --seconds 2   # plumbing

FLOPs per frame are counted once with `torch.utils.flop_counter.FlopCounterMode` on the
vision tower (matmuls, convolutions, attention; elementwise work is not counted, so the
fraction is the usual "model FLOPs utilisation"). Achieved FLOP/s = frames/s x FLOPs/frame;
on a card in `PEAK_BF16_TFLOPS` (dense bf16 tensor-core peak from the vendor's data sheet)
the fraction of peak is reported, elsewhere (CPU, unknown cards) only frames/s and FLOP/s.

Variants (`--variants`, comma-separated):
- `autocast`: fp32 weights under bf16 autocast, what `xmodal.encoding` does on CUDA;
- `bf16`: the backbone's weights in bf16 (`precision=bf16`), no per-call weight casts;
- `+compile` on either: the vision tower torch.compiled (inference graph);
- `pipeline`: the whole `xmodal.encoding.encode_videos` call from host tensors (pinned
  non-blocking copies in, results back to the host), fp32 weights + autocast.
All but `pipeline` time the model on inputs already on the device, under `torch.inference_mode`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

#: dense bf16 tensor-core peak, TFLOP/s (NVIDIA data sheets; sparsity not counted). Longest match wins.
PEAK_BF16_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,      # SXM5
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
}

VARIANTS = ("autocast", "bf16", "autocast+compile", "bf16+compile", "pipeline")


def peak_bf16_tflops(device_name: str) -> Optional[float]:
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in device_name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--backbone", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=1024, help="frames per forward")
    p.add_argument("--frames", type=int, default=12, help="frames per clip (pipeline variant)")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--variants", default=None, help=f"comma-separated of {', '.join(VARIANTS)} "
                                                    "(default: all on CUDA, autocast,pipeline on CPU)")
    p.add_argument("--budget-s", type=float, default=None, help="skip variants once this much time has passed")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.variants is None:
        args.variants = ",".join(VARIANTS) if args.device == "cuda" else "autocast,pipeline"
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")
    return args


def flops_per_frame(visual, size: int, device, dtype) -> float:
    """Model FLOPs of one frame through the vision tower (FlopCounterMode on 2 frames / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(2, 3, size, size, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        visual(x)
    return counter.get_total_flops() / 2


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup: int, seconds: float) -> Dict[str, Any]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while not times or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"iterations": len(times), "median_s": statistics.median(times)}


def measure_variant(variant: str, args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from xmodal.backbones.factory import create_backbone
    from xmodal.encoding import autocast, encode_videos

    device = torch.device(args.device)
    bf16 = variant.startswith("bf16")
    backbone = create_backbone(args.backbone, seed=0, device=device, precision="bf16" if bf16 else "fp32")
    backbone.eval()
    size = backbone.image_size
    dtype = torch.bfloat16 if bf16 else torch.float32
    visual = backbone.visual
    g = torch.Generator().manual_seed(0)
    with autocast(device, None if device.type == "cuda" else False):
        flops = flops_per_frame(visual, size, device, dtype)
    if variant == "pipeline":
        clips = max(1, args.batch // args.frames)
        host = torch.randn(clips, args.frames, 3, size, size, generator=g)
        frames = clips * args.frames

        def run():
            encode_videos(backbone, host, batch_size=clips, progress=False)
    else:
        x = torch.randn(args.batch, 3, size, size, generator=g).to(device=device, dtype=dtype)
        frames = args.batch
        fwd = visual
        if variant.endswith("+compile"):
            fwd = torch.compile(visual, dynamic=False)
        amp = autocast(device, None) if not bf16 else None

        def run():
            with torch.inference_mode():
                if amp is not None:
                    with autocast(device, None):
                        fwd(x)
                else:
                    fwd(x)
    timing = _time(run, device, args.warmup, args.seconds)
    fps = frames / timing["median_s"]
    out = {"variant": variant, "frames_per_batch": frames, "iterations": timing["iterations"],
           "batch_ms_median": 1000 * timing["median_s"], "frames_per_s": fps,
           "flops_per_frame": flops, "achieved_tflops": fps * flops / 1e12}
    peak = peak_bf16_tflops(device_name(device)) if device.type == "cuda" else None
    if peak:
        out["fraction_of_bf16_peak"] = out["achieved_tflops"] / peak
    del backbone
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def device_name(device) -> str:
    import platform

    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    name = device_name(torch.device(args.device))
    peak = peak_bf16_tflops(name) if args.device == "cuda" else None
    report: Dict[str, Any] = {"device": args.device, "device_name": name, "backbone": args.backbone,
                              "batch_frames": args.batch, "seconds_per_variant": args.seconds,
                              "peak_bf16_tflops": peak, "results": {}, "errors": {}, "skipped": []}
    start = time.perf_counter()
    for v in args.variant_list:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            report["skipped"].append(v)
            continue
        try:
            report["results"][v] = measure_variant(v, args)
        except Exception as exc:  # one variant failing (compile, memory) is reported, not fatal
            report["errors"][v] = f"{type(exc).__name__}: {exc}"
            print(f"{args.backbone} {v} failed: {report['errors'][v]}", file=sys.stderr)
    return report


def format_table(report: Dict[str, Any]) -> str:
    peak = report.get("peak_bf16_tflops")
    lines = [f"{report['backbone']} on {report['device_name']}, {report['batch_frames']} frames per forward"
             + (f", bf16 peak {peak:.0f} TFLOP/s" if peak else ""),
             f"{'variant':<20}{'frames/s':>12}{'TFLOP/s':>10}{'of peak':>9}"]
    for v, r in report["results"].items():
        frac = f"{100 * r['fraction_of_bf16_peak']:.1f}%" if "fraction_of_bf16_peak" in r else "-"
        lines.append(f"{v:<20}{r['frames_per_s']:>12,.0f}{r['achieved_tflops']:>10.3f}{frac:>9}")
    for v, e in report["errors"].items():
        lines.append(f"{v:<20} failed: {e}")
    for v in report["skipped"]:
        lines.append(f"{v:<20} skipped (budget)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report = measure(args)
    print(format_table(report))
    if args.out:
        from xmodal.atomic import atomic_write_json

        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
