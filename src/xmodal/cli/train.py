"""`xmodal train --config FILE [key=value ...] [--resume] [--out RUN_DIR]`.

Single process by default; under `torchrun --nproc_per_node N -m xmodal train ...` it runs
DDP (the global batch is split over the processes). Overrides use dotted keys with
YAML-typed values, either as trailing `key=value` words or after `--set`.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a parameter-efficient method (single process or torchrun DDP)",
        description="Train the method of a YAML config; writes config.yaml, metrics.csv, TensorBoard logs, "
                    "last/ and best/ adapter checkpoints and metrics.json into the run directory.")
    p.add_argument("--config", required=True, help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. train.lr=1e-4 method.r=16")
    p.add_argument("--set", dest="set_overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="more overrides (same form)")
    p.add_argument("--out", default=None, help="run directory (default: output_dir of the config)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/last exactly where it stopped")
    p.add_argument("--stop-after-epochs", type=int, default=None, metavar="N",
                   help="end this invocation after epoch N (resume later with --resume)")
    fast = p.add_argument_group("fast path (same as train.<key>=true; GPU ones: see benchmarks/GPU.md)")
    for flag, key, what in (("--cache-frozen-prefix", "cache_frozen_prefix",
                             "CPU: reuse each frame's and caption's output of the blocks below the lowest "
                             "adapted one (projection, partial, MSTA); exact up to float rounding"),
                            ("--compile", "compile", "torch.compile each tower whole, adapters traced in"),
                            ("--fused-adapters", "fused_adapters", "one autograd node per adapter site"),
                            ("--cuda-graphs", "cuda_graphs", "capture the training step once and replay it "
                                                            "(CUDA, one micro-batch, fixed shapes)")):
        fast.add_argument(flag, dest=f"fast_{key}", action="store_const", const=f"train.{key}=true", help=what)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xmodal.engine import distributed as dist_utils
    from xmodal.engine.config import load_config
    from xmodal.engine.train import fit

    overrides = list(args.overrides) + list(args.set_overrides)
    overrides += [v for k, v in vars(args).items() if k.startswith("fast_") and v]
    cfg = load_config(args.config, overrides)
    _resolve_defaults(cfg, args.config, overrides)
    try:
        result = fit(cfg, args.out, resume=args.resume, stop_after_epochs=args.stop_after_epochs,
                     source=args.config)
        if dist_utils.rank() == 0:
            print(f"run directory: {result.run_dir} ({result.epochs_done}/{cfg.train.epochs} epochs, "
                  f"{result.global_step} updates)")
            if result.best_epoch is not None:
                print(f"best epoch {result.best_epoch}: adapter in {result.run_dir / 'best'}")
    finally:
        dist_utils.cleanup()
    return 0


def _resolve_defaults(cfg, config_file: str, overrides) -> None:
    """Weights must be chosen (xmodal-tiny: its packaged ones); frames/words unset in the YAML
    follow the dataset's protocol (as `xmodal eval` does), and both are said on the console."""
    import os

    from xmodal.cli.eval import _protocol, require_weights
    from xmodal.engine.config import load_yaml, parse_override

    say = print if os.environ.get("RANK", "0") == "0" else (lambda *_: None)  # torchrun: rank 0 speaks
    given = set()
    for section, values in load_yaml(config_file).items():
        if isinstance(values, dict):
            given.update(f"{section}.{k}" for k, v in values.items() if v is not None)
    given.update(key for key, value in map(parse_override, overrides) if value is not None)
    how = require_weights(cfg, {}, config_file, flag=False)
    if "model.pretrained" not in given:
        say(f"weights: {cfg.model.pretrained} ({how})")
    if cfg.model.pretrained == "random":
        say("weights: RANDOM initialisation (model.pretrained=random): the adapter trains on an untrained backbone")
    protocol = _protocol(cfg.data.dataset) or {}
    for key in ("num_frames", "max_words"):
        if f"data.{key}" not in given and protocol.get(key) is not None and getattr(cfg.data, key) != protocol[key]:
            setattr(cfg.data, key, protocol[key])
            say(f"data.{key}={protocol[key]} ({cfg.data.dataset} protocol default; set data.{key} to override)")
