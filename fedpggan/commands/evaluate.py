"""``fedpggan evaluate RUN``: utility, fidelity, diversity and memorisation of a run's generators."""

from __future__ import annotations

import argparse

from fedpggan.config import EVALUATION_QUICK_SIZE as QUICK
from fedpggan.config import EVALUATION_REPORT_SIZE as DEFAULTS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="evaluate a run: TSTR vs TRTR, FID/precision/recall, diversity, memorisation",
        description="Evaluate a run's EMA generators against real data; writes evaluation.json, EVALUATION.md "
                    "and evaluation_grid.png to the run folder (or --out) and prints the tables.")
    p.add_argument("run", metavar="RUN", help="run folder written by 'fedpggan train' or 'fedpggan simulate'")
    p.add_argument("--real", metavar="SPEC", help="real data, as for --dataset: MedMNIST name (with --data-dir), "
                   ".npz path, ImageFolder directory or 'phantom' (default: the run's own dataset)")
    p.add_argument("--data-dir", metavar="DIR", help="folder holding MedMNIST .npz files (default: the run's)")
    p.add_argument("--n-synthetic", type=int, metavar="N", help=f"synthetic images per seed "
                   f"(default {DEFAULTS['n_synthetic']})")
    p.add_argument("--steps", type=int, metavar="N", help=f"classifier training steps, the same for TSTR and TRTR "
                   f"(default {DEFAULTS['steps']})")
    p.add_argument("--epochs", type=float, metavar="E", help="train the classifier for E passes over its training "
                   "set instead of a fixed number of steps")
    p.add_argument("--batch-size", type=int, default=128, metavar="B", help="classifier batch size (default 128)")
    p.add_argument("--seeds", type=int, metavar="K", help=f"repeat with seeds 0..K-1 (default {DEFAULTS['seeds']})")
    p.add_argument("--generator", choices=("1", "2", "both"), default="both",
                   help="which EMA generator to sample (default both: half from each)")
    p.add_argument("--checkpoint", metavar="FILE|ROUND", help="checkpoint .pt file or round number (default: the newest "
                   "verified one)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run (default auto)")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: the run folder)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="real split the figures are measured on: test (default; what results report) or val (to "
                        "compare settings without choosing them on the split that is reported)")
    p.add_argument("--quick", action="store_true", help=f"smoke check: {QUICK['n_synthetic']} images, {QUICK['steps']} "
                   f"steps, {QUICK['seeds']} seed(s) (explicit options still win)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedpggan.errors import FedPGGANError
    from fedpggan.evaluation import TrainingBudget, evaluate_run
    from fedpggan.io import check_folder_path

    preset = QUICK if args.quick else DEFAULTS
    n, steps, seeds = (getattr(args, k) if getattr(args, k) is not None else preset[k]
                       for k in ("n_synthetic", "steps", "seeds"))
    for flag, value in (("--n-synthetic", n), ("--steps", steps), ("--seeds", seeds),
                        ("--batch-size", args.batch_size), ("--epochs", args.epochs)):
        if value is not None and value <= 0:
            raise FedPGGANError(f"{flag} {value} is invalid: it must be > 0")
    check_folder_path(args.out)
    budget = TrainingBudget(steps=steps, epochs=args.epochs, batch_size=args.batch_size)
    evaluate_run(args.run, args.real, args.data_dir, n, seeds, args.generator, budget, args.device, args.out,
                 args.checkpoint, split=args.split)
    return 0
