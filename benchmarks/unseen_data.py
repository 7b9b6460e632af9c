"""Quality on data the defaults were never tuned on, with more than two classes.

    python benchmarks/unseen_data.py --data-dir ../shared/data --profile cpu

Builds an ImageFolder (train/val/test, one sub-folder per class: the layout hospitals export)
that pools several MedMNIST files into one multi-class task — by default PneumoniaMNIST and
BreastMNIST, 4 classes — under --work (never in the repository), then trains and evaluates the
quality benchmark's ``federated eps=10`` row on it, unchanged, with the same profile. Writes
benchmarks/results/quality-unseen-<device>-<date>.json and .md (with other --datasets,
quality-unseen-<their stems>-<device>-<date>; another profile than the device's own adds
-<profile>-profile, as quality.py does), with per-class recall.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from datetime import date
from pathlib import Path

from PIL import Image

from fedpggan.cli import run_reporting_errors
from fedpggan.data import open_dataset
from fedpggan.errors import FedPGGANError
from fedpggan.io import atomic_write_bytes, atomic_write_json, new_results_paths
from fedpggan.plots import to_uint8

sys.path.insert(0, str(Path(__file__).parent))  # the quality benchmark, next to this script
import quality  # noqa: E402

SPLITS = ("train", "val", "test")
DEFAULT_DATASETS = ["pneumoniamnist", "breastmnist"]
ROW = "federated eps=10"


def class_folder(dataset: str, class_name: str) -> str:
    """``breastmnist`` + ``normal, benign`` -> ``breastmnist_normal_benign`` (an npz path gives its stem)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", f"{Path(dataset).stem}_{class_name}").strip("_")


def build_folder(specs: list[str], data_dir: str | None, out: Path) -> None:
    """Write every split of every dataset in ``specs`` as PNGs under ``out/<split>/<dataset>_<class>``.
    Built under a temporary name and renamed when complete, so an interrupted build is never
    mistaken for a finished folder."""
    if out.exists():
        raise FedPGGANError(f"{out}: already exists; remove it or pass another --work")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for spec in specs:
        for split in SPLITS:
            data = open_dataset(spec, split, data_dir)
            pixels = to_uint8(data.images).numpy()
            for i, (img, label) in enumerate(zip(pixels, data.labels.tolist())):
                folder = partial / split / class_folder(data.name, data.class_names[label])
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img[..., 0] if data.channels == 1 else img).save(folder / f"{i:05d}.png")
    partial.rename(out)


def per_class_table(row: dict) -> str:
    evaluation = json.loads((Path(row["run_folder"]) / "evaluation.json").read_text())
    recall = evaluation["tstr"]["per_class_recall"]
    trtr = evaluation["trtr"]["per_class_recall"]["mean"]
    lines = ["", "Per-class recall (TSTR mean over classifier seeds; TRTR beside it):", "",
             "| class | TSTR recall | ± | TRTR recall |", "|---|---|---|---|"]
    lines += [f"| {c} | {m:.3f} | {s:.3f} | {t:.3f} |"
              for c, m, s, t in zip(row["classes"], recall["mean"], recall["std"], trtr)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with the MedMNIST npz files")
    p.add_argument("--datasets", default=",".join(DEFAULT_DATASETS),
                   help="comma-separated MedMNIST names (or npz paths) to pool")
    p.add_argument("--profile", choices=sorted(quality.PROFILES), default=None, help="default: gpu if there is one")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default="runs/unseen", help="where the ImageFolder and the run folder go")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    args = p.parse_args(argv)
    return run_reporting_errors(lambda: run(args), args.debug)


def run(args: argparse.Namespace) -> int:
    device, device_name = quality.resolve_device(args.device)
    profile_name = args.profile or ("gpu" if device == "cuda" else "cpu")
    profile = quality.PROFILES[profile_name]
    specs = [s.strip() for s in args.datasets.split(",") if s.strip()]
    work = Path(args.work) / profile_name
    pooled = "" if specs == DEFAULT_DATASETS else "-".join(Path(s).stem for s in specs) + "-"  # other data: its own file
    today = date.today().isoformat()
    stem = Path(args.results) / f"quality-unseen-{pooled}{device_name}{quality.profile_tag(profile_name, device)}-{today}"
    json_path, md_path = new_results_paths(stem)
    folder = work / ("folder-" + "-".join(Path(s).stem for s in specs))  # an npz path gives its file stem
    if not folder.exists():
        build_folder(specs, args.data_dir, folder)
    classes = open_dataset(str(folder)).class_names
    print(f"{folder}: {len(classes)} classes: {', '.join(classes)}", flush=True)
    base = quality.base_config(str(folder), args.data_dir, device, profile)
    shown = " + ".join(Path(s).name for s in specs)  # an npz path by its file name: where it lies is no result
    name = f"unseen: {shown} as one ImageFolder ({len(classes)} classes), {ROW}"
    _, kind, length, overrides = next(spec for spec in quality.row_specs(profile) if spec[0] == ROW)
    row = {**quality.run_gan_row(name, kind, length, overrides, base, work, profile, device), "classes": classes}
    meta = {**quality.run_meta(f"unseen data ({shown})", device_name, profile_name), "date": today}
    atomic_write_json(json_path, {"meta": meta, "rows": [row]})
    text = quality.markdown([row], meta) + per_class_table(row)
    atomic_write_bytes(md_path, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
