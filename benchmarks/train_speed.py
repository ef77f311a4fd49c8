"""Training step time and peak memory of each method relative to full fine-tuning.

    python benchmarks/train_speed.py --device cuda --batch 32 --frames 12 --steps 10 --rounds 3
    python benchmarks/train_speed.py --backbone xmodal-tiny --batch 2 --frames 4 --steps 2   # quick CPU check

One training step = the engine's `Trainer.step` (forward of both towers on 12-frame clips,
text-conditioned pooling, symmetric InfoNCE, backward, AdamW) on a random-weight backbone
with random inputs. Configurations are measured *interleaved*: every round runs `--steps`
steps of each configuration in turn, and the reported step time is the median over all
measured steps, so drift of the machine (clocks, other load) hits every configuration alike.

Peak memory, honestly defined as "what this configuration needs": backbone weights + method
tensors + optimizer state + the step's transient peak (activations, gradients).
- CUDA: `torch.cuda.max_memory_allocated` during the step minus the memory allocated
  before it (which includes the other configurations kept alive for interleaving), plus
  this configuration's own resident bytes (parameters, optimizer state).
- CPU: there is no allocator counter, so each configuration runs in a fresh subprocess:
  peak resident set size (VmHWM) minus the RSS after importing torch/open_clip, i.e. the
  real memory the process grew by while building the model and running `--mem-steps`
  steps. Allocator caching makes this an upper bound of the live tensor bytes.

Fast paths: `--variants eager,fused,bf16w,...` measures every method under each variant,
interleaved with the others (names `method[variant]`); a variant is `+`-joined options of
`xmodal.engine.fastpath`: `fused` (one autograd node per adapter site), `bf16w` (frozen
matrix weights stored in bf16; bit-identical under bf16 autocast), `compile` (torch.compile
of each tower as a whole, adapter hooks traced in), `graphs` (CUDA-graph replay of the whole
step), `ckpt` (the engine's `grad_checkpoint_frozen`: recompute the blocks in backward),
`blockcompile` (the engine's `compile`: block by block); `eager` is none of them. Ratios are
to `full_finetune` under `--baseline-variant` (default eager). Full fine-tuning is measured
under every variant too (`ckpt` does not apply to it: it has no frozen blocks).
`--budget-s` stops after the round in which the budget ran out (at least one round), and
configurations not built when 60% of it is spent are skipped (listed under `errors`).
`--configs method:variant,...` measures an explicit list instead of every method x variant.
Graph-replayed configurations report no peak memory (the graph's pool, reserved at capture,
is invisible to `max_memory_allocated`).

The compute bound of the step-time ratio with every block adapted is about 0.67: frozen
layers skip weight gradients but still need input gradients (forward + 1 of 2 backward
matmuls = 2 of 3 units). Targets for the Cross-Modal Adapter: step time <= 0.70, peak
memory <= 0.45 of full fine-tuning.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

BASELINE = "full_finetune"
WORDS = "a man woman dog cat runs walks plays music on the street in kitchen with red blue ball car".split()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if _cuda() else "cpu")
    p.add_argument("--backbone", default="ViT-B-32", help="architecture (xmodal-tiny for a quick run)")
    p.add_argument("--batch", type=int, default=32, help="clips (and captions) per step")
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--max-words", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="measured steps per configuration and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps per configuration first")
    p.add_argument("--mem-steps", type=int, default=2, help="steps of the CPU memory subprocess")
    p.add_argument("--methods", default="all",
                   help="comma-separated methods, or 'all' for every registered one (full_finetune is always "
                        "the baseline)")
    p.add_argument("--pooling", default="text_conditioned", choices=["mean", "text_conditioned"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--grad-checkpoint-frozen", action="store_true", help="= the variant option ckpt, for all")
    p.add_argument("--compile", action="store_true", help="= the variant option blockcompile, for all")
    p.add_argument("--variants", default="eager",
                   help="comma-separated fast-path variants, each '+'-joined options: " + ", ".join(OPTIONS))
    p.add_argument("--configs", default=None,
                   help="explicit 'method:variant' list (comma-separated) instead of every method x variant; "
                        "full_finetune under the baseline variant is always added")
    p.add_argument("--baseline-variant", default=None, help="variant of full_finetune the ratios divide by "
                                                             "(default: the first variant)")
    p.add_argument("--budget-s", type=float, default=None, help="stop after the round that exceeds this")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's choice; use 1 on a shared machine, where "
                        "oversubscribed OpenMP threads make every step many times slower)")
    p.add_argument("--_memory-probe", dest="memory_probe", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_probe-variant", dest="probe_variant", default="eager", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variant_list = [parse_variant(v) for v in args.variants.split(",") if v.strip()] or ["eager"]
    args.baseline_variant = parse_variant(args.baseline_variant) if args.baseline_variant else args.variant_list[0]
    if args.baseline_variant not in args.variant_list:
        args.variant_list.insert(0, args.baseline_variant)
    args.config_list = None
    if args.configs:
        pairs = []
        for item in args.configs.split(","):
            method, _, variant = item.strip().partition(":")
            if method:
                pairs.append((method.strip(), parse_variant(variant or "eager")))
        base = (BASELINE, args.baseline_variant)
        args.config_list = [base] + [p for p in pairs if p != base]
        args.variant_list = list(dict.fromkeys(v for _, v in args.config_list))
    return args


#: fast-path options a variant can join with '+'
OPTIONS = ("fused", "bf16w", "compile", "graphs", "ckpt", "blockcompile")


def parse_variant(text: str) -> str:
    """'compile+fused' -> canonical 'fused+compile' (OPTIONS order); 'eager' = no option."""
    parts = [t.strip() for t in text.strip().split("+") if t.strip() and t.strip() != "eager"]
    unknown = [t for t in parts if t not in OPTIONS]
    if unknown:
        raise SystemExit(f"unknown fast-path option(s) {unknown} in variant {text!r}; known: eager, {', '.join(OPTIONS)}")
    return "+".join(o for o in OPTIONS if o in parts) or "eager"


def config_name(method: str, variant: str, args: argparse.Namespace) -> str:
    return method if len(args.variant_list) == 1 else f"{method}[{variant}]"


def planned_configs(args: argparse.Namespace) -> List[tuple]:
    """(method, variant) pairs in measuring order: the explicit --configs, else variants x methods."""
    if args.config_list is not None:
        known = set(method_names("all"))
        unknown = sorted({m for m, _ in args.config_list} - known)
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; registered: {sorted(known)}")
        return list(args.config_list)
    return [(m, v) for v in args.variant_list for m in method_names(args.methods)]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


# ------------------------------------------------------------------ configurations
class Config:
    """One method ready to step: model, trainer, a fixed batch."""

    def __init__(self, name: str, args: argparse.Namespace, variant: str = "eager"):
        import torch

        from xmodal.backbones.factory import create_backbone
        from xmodal.engine.config import TrainConfig
        from xmodal.engine.fastpath import CudaGraphStep, FastPathOptions, make_device_step, prepare_fast_path
        from xmodal.engine.heads import SimilarityHead
        from xmodal.engine.train import Trainer
        from xmodal.methods import apply_method, make_config

        self.name, self.variant = name, variant
        opts = set(variant.split("+"))
        device = torch.device(args.device)
        backbone = create_backbone(args.backbone, seed=args.seed, device=device)
        self.model = apply_method(backbone, make_config(name))
        ckpt = (args.grad_checkpoint_frozen or "ckpt" in opts) and name != BASELINE
        tcfg = TrainConfig(lr=1e-5, precision=args.precision, device=args.device, grad_clip=1.0,
                           grad_checkpoint_frozen=ckpt, compile=args.compile or "blockcompile" in opts,
                           progress=False)
        self.trainer = Trainer(self.model, SimilarityHead(args.pooling), tcfg, total_steps=10**6, device=device)
        self.fast = prepare_fast_path(
            self.model, FastPathOptions(compile="compile" in opts, compile_backend=args.compile_backend,
                                        bf16_frozen_weights="bf16w" in opts),
            device, self.trainer.precision)
        # the fused switch is process-wide: `step` sets it per configuration, so interleaving works
        self.fused = "fused" in opts
        self.fast_path = self.fast.describe() + ("; fused_adapters" if self.fused else "")
        if self.fast.refused:
            raise RuntimeError(self.fast_path)
        g = torch.Generator().manual_seed(args.seed)
        captions = [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (args.max_words,), generator=g))
                    for _ in range(args.batch)]
        size = backbone.image_size
        self.batch = {
            "tokens": self.model.tokenize(captions, max_words=args.max_words).to(device),
            "pixels": torch.randn(args.batch, args.frames, 3, size, size, generator=g).to(device),
            "frame_mask": torch.ones(args.batch, args.frames, dtype=torch.bool, device=device),
            "captions": captions,
        }
        self.device = device
        self.graph = None
        if "graphs" in opts:
            self.graph = CudaGraphStep(make_device_step(self.trainer), self.batch, optimizer=self.trainer.optimizer,
                                       device=device, warmup=2)
        # unmeasured steps beyond --warmup: graph warm-up + capture, compile + a possible recompile
        self.extra_warmup = (self.graph.warmup + 1 if self.graph is not None else 0) + (1 if "compile" in opts else 0)
        self.trainable, self.total = self.model.parameter_counts()
        self.precision = self.trainer.precision
        self.times: List[float] = []
        self.peak_bytes: Optional[int] = None

    def close(self) -> None:
        """Undo the fast path (process-wide switches such as the fused adapters) and free."""
        self.fast.close()
        self.trainer.close()
        self.model = self.trainer = self.batch = self.graph = None

    def resident_bytes(self) -> int:
        """Parameters (backbone + method) and optimizer state of this configuration."""
        import torch

        seen, n = set(), 0
        for p in list(self.model.parameters()):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel() * p.element_size()
        for state in self.trainer.optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    n += v.numel() * v.element_size()
        return n

    def step(self, measure_memory: bool = False) -> float:
        import torch

        from xmodal.methods import fused

        with fused.enabled(self.fused):
            return self._step(measure_memory)

    def _step(self, measure_memory: bool) -> float:
        import torch

        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            if measure_memory:
                before = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        if self.graph is not None:
            self.graph(self.batch)
            self.trainer.scheduler.step()
        else:
            self.trainer.step([self.batch])
            pending = getattr(self.trainer, "pending", None)
            if pending is not None:
                pending.clear()  # the engine collects at log intervals; nothing to log here
        if cuda:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        if cuda and measure_memory and self.graph is None:
            # (a replayed graph allocates nothing: its private pool, reserved at capture, is invisible
            # to these counters, so graph configurations report no peak rather than a wrong one)
            transient = torch.cuda.max_memory_allocated(self.device) - before
            peak = transient + self.resident_bytes()
            self.peak_bytes = max(self.peak_bytes or 0, peak)
        return dt


# --------------------------------------------------------------------- CPU memory
def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(args: argparse.Namespace) -> None:
    """Subprocess entry: RSS growth of building one configuration and running a few steps."""
    import torch  # noqa: F401
    import open_clip  # noqa: F401

    import xmodal.engine.train  # noqa: F401
    import xmodal.methods  # noqa: F401

    if args.threads:
        torch.set_num_threads(args.threads)
    base = _rss("VmRSS")
    cfg = Config(args.memory_probe, args, args.probe_variant)
    for _ in range(max(1, args.mem_steps)):
        cfg.step()
    print(json.dumps({"peak_bytes": _rss("VmHWM") - base}))


def cpu_peak_bytes(name: str, args: argparse.Namespace, variant: str = "eager") -> Optional[int]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory-probe", name, "--_probe-variant", variant,
           "--compile-backend", args.compile_backend, "--device", "cpu",
           "--backbone", args.backbone, "--batch", str(args.batch), "--frames", str(args.frames),
           "--max-words", str(args.max_words), "--mem-steps", str(args.mem_steps), "--pooling", args.pooling,
           "--precision", args.precision, "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.grad_checkpoint_frozen:
        cmd.append("--grad-checkpoint-frozen")
    if args.compile:
        cmd.append("--compile")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  memory probe of {name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"])


# ---------------------------------------------------------------------------- main
def method_names(spec: str) -> List[str]:
    from xmodal.methods import list_methods

    names = list_methods() if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in names if m not in list_methods()]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; registered: {list_methods()}")
    return [BASELINE] + [m for m in names if m != BASELINE]


def summarize(configs: Dict[str, "Config"], errors: Dict[str, str], args: argparse.Namespace,
              rounds_done: Optional[int] = None) -> Dict[str, Any]:
    base = configs[config_name(BASELINE, args.baseline_variant, args)]
    base_time = statistics.median(base.times)
    results = {}
    for name, cfg in configs.items():
        t = statistics.median(cfg.times)
        entry = {"method": cfg.name, "variant": cfg.variant, "fast_path": cfg.fast_path,
                 "trainable_params": cfg.trainable, "total_params": cfg.total,
                 "step_ms_median": 1000 * t, "step_ms_all": [1000 * x for x in cfg.times],
                 "step_time_ratio": t / base_time,
                 "samples_per_s": args.batch / t}
        if cfg.peak_bytes is not None and base.peak_bytes:
            entry["peak_mb"] = cfg.peak_bytes / 2**20
            entry["peak_memory_ratio"] = cfg.peak_bytes / base.peak_bytes
        results[name] = entry
    return {"device": args.device, "device_name": _device_name(args.device), "backbone": args.backbone,
            "batch": args.batch, "frames": args.frames, "max_words": args.max_words, "steps": args.steps,
            "rounds": args.rounds, "rounds_done": rounds_done if rounds_done is not None else args.rounds,
            "budget_s": args.budget_s, "pooling": args.pooling, "precision": base.precision,
            "grad_checkpoint_frozen": args.grad_checkpoint_frozen, "compile": args.compile,
            "variants": args.variant_list, "baseline": config_name(BASELINE, args.baseline_variant, args),
            "memory_method": ("cuda max_memory_allocated (step transient + own resident)" if args.device == "cuda"
                              else "fresh subprocess peak RSS (VmHWM) minus RSS after imports"),
            "results": results, "errors": errors}


def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def format_table(report: Dict[str, Any]) -> str:
    lines = [f"{report['backbone']} on {report['device_name']}: batch {report['batch']} x {report['frames']} frames, "
             f"{report['precision']}, pooling {report['pooling']}"
             f"{', recompute frozen blocks' if report['grad_checkpoint_frozen'] else ''}"
             f"{', compiled' if report['compile'] else ''}; ratios to {report.get('baseline', BASELINE)}",
             f"{'configuration':<36}{'trainable':>12}{'step ms':>10}{'time/FT':>9}{'peak MB':>10}{'mem/FT':>8}"]
    for name, r in report["results"].items():
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else "-"
        ratio = f"{r['peak_memory_ratio']:.2f}" if "peak_memory_ratio" in r else "-"
        lines.append(f"{name:<36}{r['trainable_params']:>12,}{r['step_ms_median']:>10.1f}"
                     f"{r['step_time_ratio']:>9.2f}{peak:>10}{ratio:>8}")
    for name, err in report.get("errors", {}).items():
        lines.append(f"{name:<36} failed: {err}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_probe:
        memory_probe(args)
        return 0
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


def measure(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    start = time.perf_counter()
    configs: Dict[str, Config] = {}
    errors: Dict[str, str] = {}
    baseline = config_name(BASELINE, args.baseline_variant, args)
    for name, variant in planned_configs(args):
        key = config_name(name, variant, args)
        if key != baseline and args.budget_s is not None and time.perf_counter() - start > 0.6 * args.budget_s:
            errors[key] = "skipped: 60% of --budget-s spent building the configurations before it"
            continue
        try:
            cfg = Config(name, args, variant)
            for _ in range(args.warmup + cfg.extra_warmup):
                cfg.step()
            configs[key] = cfg
        except Exception as exc:  # a method that cannot run here is reported, not fatal
            if key == baseline:
                raise
            errors[key] = f"{type(exc).__name__}: {exc}"
            print(f"skipping {key}: {errors[key]}", file=sys.stderr)
            _free(args.device)
    rounds_done = 0
    for r in range(args.rounds):
        for name, cfg in configs.items():
            for s in range(args.steps):
                cfg.times.append(cfg.step(measure_memory=args.device == "cuda" and not args.no_memory))
        rounds_done += 1
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            break
    if args.device == "cpu" and not args.no_memory:
        keys = list(configs)
        for cfg in configs.values():  # free the in-process models before the probes run
            cfg.close()
        gc.collect()
        for key in keys:
            cfg = configs[key]
            cfg.peak_bytes = cpu_peak_bytes(cfg.name, args, cfg.variant)
    report = summarize(configs, errors, args, rounds_done)
    for cfg in configs.values():
        if cfg.model is not None:
            cfg.close()
    _free(args.device)
    return report


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


if __name__ == "__main__":
    raise SystemExit(main())
