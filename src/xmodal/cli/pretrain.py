"""`xmodal pretrain`: contrastive pretraining of the project's small CLIP on a generated corpus."""

from __future__ import annotations

import argparse
import shlex


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="contrastive pretraining of the project's small CLIP",
        description="Train an OpenCLIP architecture from random init on an image-caption JSONL corpus "
                    "(train.jsonl; test.jsonl is the held-out zero-shot split) and write model.safetensors "
                    "(fp16), MODEL_CARD.md and pretrain_summary.json to --out.",
    )
    p.add_argument("--data", required=True, help="corpus folder with train.jsonl [and test.jsonl]")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log, release files)")
    p.add_argument("--arch", default="xmodal-tiny", help="OpenCLIP architecture name (default xmodal-tiny)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--no-augment", action="store_true", help="no shift/brightness augmentation")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    p.add_argument("--eval-every", type=int, default=0, help="held-out eval every N steps (0: only at the end)")
    p.add_argument("--eval-max", type=int, default=None, help="evaluate on at most N held-out images")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out/checkpoint (starts fresh when there is none)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop with a checkpoint at this step (finish later with --resume)")
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces these weights: every option that changes them, explicit."""
    parts = ["xmodal", "pretrain", "--data", str(args.data), "--out", str(args.out), "--arch", args.arch,
             "--steps", str(args.steps), "--batch", str(args.batch), "--lr", f"{args.lr:g}",
             "--min-lr", f"{args.min_lr:g}", "--weight-decay", f"{args.weight_decay:g}",
             "--warmup", str(args.warmup), "--seed", str(args.seed), "--device", args.device]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.amp:
        parts.append("--amp")
    if args.no_augment:
        parts.append("--no-augment")
    if args.eval_max:
        parts += ["--eval-max", str(args.eval_max)]
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    from xmodal.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(
        data=args.data, out=args.out, arch=args.arch, steps=args.steps, batch=args.batch, lr=args.lr,
        min_lr=args.min_lr, weight_decay=args.weight_decay, warmup=args.warmup, seed=args.seed,
        device=args.device, threads=args.threads, amp=args.amp, augment=not args.no_augment,
        log_every=args.log_every, save_every=args.save_every, eval_every=args.eval_every,
        eval_max=args.eval_max, resume=args.resume, stop_after=args.stop_after,
    )
    pretrain(cfg, command=command_line(args))
    return 0
