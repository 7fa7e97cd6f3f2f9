"""Command line: ``python -m erasers world2 train`` (registered through ``erasers_diffusers.cli.PLUGINS``).

``add_subparsers(subparsers)`` adds the ``world2`` command to the pack's top-level parser; each
sub-command stores its handler in ``func``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def add_subparsers(subparsers) -> argparse.ArgumentParser:
    world2 = subparsers.add_parser("world2", help="world 2: artists, characters and an implicit unsafe proxy")
    sub = world2.add_subparsers(dest="world2_command", required=True)

    train = sub.add_parser(
        "train", help="train the contrastive encoder, the text-to-image model and the judges from a seed"
    )
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--tiny", action="store_true", help="the test-sized configuration (seconds; no quality)")
    train.add_argument("--clip-steps", type=int, default=None)
    train.add_argument("--unet-steps", type=int, default=None)
    train.add_argument("--judge-steps", type=int, default=None)
    # One thread by default: more threads change the float summation order, so the weights would differ
    # from run to run of the same command on machines with different core counts.
    train.add_argument("--threads", type=int, default=1, help="torch threads (default 1: reproducible bit for bit)")
    train.add_argument(
        "--out",
        type=Path,
        default=Path("world2_world"),
        help="output folder (default ./world2_world; never inside the package)",
    )
    train.add_argument(
        "--reuse",
        type=Path,
        default=None,
        metavar="DIR",
        help="load the CLIP / judges files from DIR when they were trained with this run's settings and seed "
        "(each stage is seeded on its own, so they are the weights training would give); retrain the rest",
    )
    train.add_argument("--overwrite", action="store_true", help="replace world-2 files already in --out")
    train.add_argument("--skip-eval", action="store_true", help="do not measure base fidelity")
    train.set_defaults(func=_train)
    return world2


def _train(args) -> int:
    from .train import TrainConfig, train_all

    cfg = TrainConfig.tiny(args.seed) if args.tiny else TrainConfig(seed=args.seed)
    if args.clip_steps is not None:
        cfg.clip.steps = args.clip_steps
    if args.unet_steps is not None:
        cfg.unet.steps = args.unet_steps
    if args.judge_steps is not None:
        cfg.judges.steps = args.judge_steps
    t0 = time.time()
    result = train_all(
        cfg,
        out_dir=args.out,
        threads=args.threads,
        skip_eval=args.skip_eval,
        reuse_dir=args.reuse,
        overwrite=args.overwrite,
    )
    print(json.dumps(result, indent=2))
    print(f"wall time: {time.time() - t0:.1f} s ({(time.time() - t0) / 60:.1f} min) on {result['threads']} thread(s)")
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(prog="python -m erasers")
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
