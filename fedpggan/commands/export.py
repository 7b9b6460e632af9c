"""``fedpggan export RUN --out DIR``: a shareable synthetic dataset with its datasheet."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export synthetic images of a run (MedMNIST npz, ImageFolder PNGs, datasheet)",
        description="Sample the run's EMA generators into DIR/synthetic.npz (MedMNIST layout), DIR/images/ "
                    "(torchvision ImageFolder) and DIR/datasheet.json + DATASHEET.md. Refuses runs whose privacy "
                    "ledger is missing, tampered or over budget, and runs without a passing audit of their current "
                    "content unless told otherwise.")
    p.add_argument("run", metavar="RUN", help="run folder (from `fedpggan train` or `simulate`)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be new or empty)")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--n", type=int, metavar="N", help="total images, split over classes by --class-prior "
                       "(default 1000)")
    count.add_argument("--per-class", metavar="K[,K2,...]", help="images per class: one count for all, or one each")
    p.add_argument("--class-prior", default="uniform", metavar="uniform|FILE",
                   help="public class weights for --n: 'uniform', a JSON/text file of weights, or '0.3,0.7' "
                        "(never the private label counts) (default: uniform)")
    p.add_argument("--generator", choices=("1", "2", "both"), default="both",
                   help="sample G1, G2 or half from each (default: both)")
    p.add_argument("--checkpoint", metavar="FILE|ROUND", help="checkpoint to sample (default: the newest verified one)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--format", default="npz,imagefolder", metavar="LIST",
                   help="npz, imagefolder or both, comma-separated (default: npz,imagefolder)")
    p.add_argument("--split", default="1", metavar="TRAIN/VAL/TEST",
                   help="split fractions, e.g. 0.8/0.1/0.1 (default: all train)")
    p.add_argument("--image-size", type=int, metavar="S", help="resample images to SxS, 4 to 1024 (bilinear, antialiased)")
    p.add_argument("--device", choices=("cpu", "auto", "cuda"), default="cpu",
                   help="where to sample; only cpu is bit-for-bit reproducible (default: cpu)")
    p.add_argument("--chunk-size", type=int, default=500, metavar="K", help="images generated at a time (default: 500; fewer where they would take over 256 MB, "
                   "at a large --image-size); the bytes written do not depend on it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty DIR (only once the new export is complete)")
    p.add_argument("--audit-report", metavar="PATH",
                   help="the audit.json (or its folder) of `fedpggan audit RUN --out DIR` (default: RUN/audit.json); "
                        "it must have audited the run as it is now")
    p.add_argument("--allow-unaudited", action="store_true",
                   help="export without a passing audit of the run as it is now (the datasheet says UNAUDITED, or "
                        "AUDIT FAILED when the audit failed)")
    p.add_argument("--allow-no-dp", action="store_true",
                   help="export a run trained without DP (the datasheet says NO PRIVACY GUARANTEE); such a run can "
                        "never pass the audit, so it also needs --allow-unaudited")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedpggan.export import ExportOptions, export_run
    from fedpggan.export.options import parse_formats, parse_per_class, parse_split

    options = ExportOptions(
        n=args.n, per_class=parse_per_class(args.per_class) if args.per_class else None,
        class_prior=args.class_prior, generator=args.generator, checkpoint=args.checkpoint, seed=args.seed,
        formats=parse_formats(args.format), split=parse_split(args.split), image_size=args.image_size,
        device=args.device, chunk_size=args.chunk_size, overwrite=args.overwrite, audit_report=args.audit_report,
        allow_unaudited=args.allow_unaudited, allow_no_dp=args.allow_no_dp)
    sheet = export_run(args.run, args.out, options)
    eps = (sheet["privacy"]["guarantee"] or {}).get("epsilon") if sheet["privacy"]["dp"] else None
    for warning in sheet["warnings"]:
        print(f"warning: {warning}")
    print(f"exported {sheet['export']['num_images']} images to {args.out} "
          f"(epsilon={format(eps, '.4g') if eps is not None else 'NONE'}); see {args.out}/DATASHEET.md")
    return 0
