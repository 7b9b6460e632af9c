"""``fedpggan audit RUN``: privacy-budget audit of a run folder.

Exit 0: the audit passed; 1: it found a violation (a run without DP always fails);
2: it could not run (missing or unreadable files).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit", help="audit a run's privacy ledger (and, with --mia, attack the model)",
        description="Recompute every site's epsilon with Opacus RDP, Opacus PRV and Google dp-accounting PLD, check "
                    "the ledger against the config, itself and the checkpoint files; with --mia, run membership "
                    "inference against the trained model. Writes audit.json, AUDIT.md and audit_epsilon.png. "
                    "Exit 0 pass, 1 violation found, 2 audit could not run.")
    p.add_argument("run", metavar="RUN", help="run folder (holds run.json and privacy_ledger.json)")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: the run folder)")
    mia = p.add_argument_group("empirical audit")
    mia.add_argument("--mia", action="store_true", help="also run membership-inference attacks (needs the real data)")
    mia.add_argument("--data-dir", metavar="DIR", help="where the run's dataset is (default: as recorded in run.json)")
    mia.add_argument("--holdout", metavar="SPEC",
                     help="dataset whose test split holds the non-members (default: the run dataset's test split)")
    mia.add_argument("--mia-records", type=int, default=1000, metavar="N",
                     help="at most N members per site and N non-members (default: 1000)")
    mia.add_argument("--synthetic", type=int, default=1000, metavar="M",
                     help="synthetic images for the distance attack (default: 1000)")
    mia.add_argument("--bootstraps", type=int, default=200, metavar="B",
                     help="bootstrap resamples for the confidence intervals (default: 200)")
    mia.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="where to run the model (default: auto)")
    mia.add_argument("--seed", type=int, default=0,
                     help="seed for sub-sampling, synthetic images and bootstraps (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedpggan.audit import MiaOptions, audit_run, summary
    from fedpggan.errors import FedPGGANError
    from fedpggan.io import check_folder_path
    from fedpggan.runs import RunFolder

    for name, least in (("mia_records", 2), ("synthetic", 1)):  # the epsilon bound selects on one half, certifies on the other
        if getattr(args, name) < least:
            raise FedPGGANError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: it must be >= {least}")
    for name in ("bootstraps", "seed"):
        if getattr(args, name) < 0:
            raise FedPGGANError(f"--{name} {getattr(args, name)} is invalid: it must be >= 0")
    check_folder_path(args.out)
    if args.out:
        RunFolder(args.run).check_report_folder(Path(args.out))
    mia = MiaOptions(args.data_dir, args.holdout, args.mia_records, args.synthetic, args.bootstraps,
                     args.device, args.seed) if args.mia else None
    result = audit_run(args.run, args.out, mia)
    print(summary(result))
    print(f"report: {(args.out or args.run)}/AUDIT.md")
    if args.out and result["passed"]:
        print(f"to export this run: fedpggan export {args.run} --audit-report {args.out} --out EXPORT_DIR")
    return 0 if result["passed"] else 1
