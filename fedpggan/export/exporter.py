"""``export_run``: checks, then plan, sample, write and describe a synthetic dataset.

Images are generated chunk by chunk and go straight to the npz member and the PNG files, so
memory is bounded by ``chunk_size`` whatever the number of images.
"""

from __future__ import annotations

import shlex
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fedpggan.build import pick_device
from fedpggan.errors import FedPGGANError
from fedpggan.export.datasheet import DATASHEET_FILES, build_datasheet, write_datasheet
from fedpggan.export.imagefolder import ImageFolderWriter, class_folders
from fedpggan.export.npz_writer import NpzWriter
from fedpggan.export.options import DEFAULT_N, ExportOptions
from fedpggan.export.plan import SplitPlan, make_plan
from fedpggan.export.provenance import verify_run
from fedpggan.export.sampler import sample_chunk
from fedpggan.export.staging import check_target, staged_folder
from fedpggan.io import sha256_file
from fedpggan.runs import RunFolder
from pggan_model import PGGAN, gan_from_checkpoint

NPZ_NAME = "synthetic.npz"
IMAGES_DIR = "images"


def export_run(run_dir: str | Path, out: str | Path, options: ExportOptions = ExportOptions()) -> dict[str, Any]:
    """Write ``synthetic.npz``, ``images/`` and the datasheet of ``run_dir`` into ``out``
    (all or nothing); returns the datasheet. Same run, checkpoint, options => same bytes on CPU."""
    folder, out = RunFolder(run_dir), Path(out)
    check_target(out, folder.root, options.overwrite, {NPZ_NAME, IMAGES_DIR, *DATASHEET_FILES})
    prov = verify_run(folder, options.checkpoint, options.allow_unaudited, options.allow_no_dp, options.audit_report)
    gan, _ = gan_from_checkpoint(prov.checkpoint, pick_device(options.device))
    if gan.single and options.generator == "2":
        raise FedPGGANError(f"--generator 2: {prov.checkpoint} is the single-generator baseline; use --generator 1")
    class_names = list(prov.run.get("dataset", {}).get("class_names") or [])
    if len(class_names) != gan.shape.num_classes:
        raise FedPGGANError(f"{folder.run_json}: lists {len(class_names)} class names but the checkpoint has "
                            f"{gan.shape.num_classes} classes; the run folder is inconsistent")
    generator = "1" if gan.single else options.generator
    counts = options.class_counts(class_names)
    if "imagefolder" in options.formats and (empty := [name for name, n in zip(class_names, counts) if n == 0]):
        raise FedPGGANError(f"class '{empty[0]}' would get no image, and an ImageFolder cannot hold an empty class "
                            "(torchvision refuses it; leaving its folder out would renumber the classes): raise --n or "
                            "that class's --per-class / --class-prior, or export --format npz")
    plans = make_plan(counts, options.split, generator, options.seed)
    with staged_folder(out) as staging:
        write_images(gan, plans, staging, class_names, options)
        summary = describe(plans, staging, class_names, gan, options, generator, prov.checkpoint, folder.root, out)
        sheet = build_datasheet(prov, summary)
        write_datasheet(staging, sheet)
    return sheet


def write_images(gan: PGGAN, plans: list[SplitPlan], folder: Path, class_names: list[str],
                 options: ExportOptions) -> None:
    """Stream every planned image into the npz and/or the ImageFolder tree, one chunk at a time."""
    size = options.image_size or gan.shape.image_size
    pixel_shape = (size, size) + ((3,) if gan.shape.channels == 3 else ())
    npz = NpzWriter(folder / NPZ_NAME) if "npz" in options.formats else None
    pngs = (ImageFolderWriter(folder / IMAGES_DIR, class_names, [p.name for p in plans], plans[-1].stop)
            if "imagefolder" in options.formats else None)
    chunk = options.images_per_chunk(size, gan.shape.channels)
    with npz or nullcontext(), tqdm(total=plans[-1].stop, unit="img", desc="export") as bar:
        for plan in plans:
            n = len(plan.labels)
            if npz:
                npz.begin(f"{plan.name}_images", (n, *pixel_shape), np.dtype(np.uint8))
            for lo in range(0, n, chunk):
                hi = min(lo + chunk, n)
                images = sample_chunk(gan, plan, lo, hi, options.seed, options.image_size)
                if npz:
                    npz.write(images)
                if pngs:
                    pngs.write(plan.name, lo, images, plan.labels[lo:hi])
                bar.update(hi - lo)
            if npz:
                npz.end()
                npz.add(f"{plan.name}_labels", plan.labels.reshape(-1, 1))


def describe(plans: list[SplitPlan], folder: Path, class_names: list[str], gan: PGGAN, options: ExportOptions,
             generator: str, checkpoint: Path, run_root: Path, out: Path) -> dict[str, Any]:
    """The export section of the datasheet: counts, files, and the command that recreates it."""
    def per_class(labels: np.ndarray) -> dict[str, int]:
        return dict(zip(class_names, np.bincount(labels, minlength=len(class_names)).tolist()))

    labels = np.concatenate([p.labels for p in plans])
    generators = np.concatenate([p.generators for p in plans])
    files = {NPZ_NAME: sha256_file(folder / NPZ_NAME)} if "npz" in options.formats else {}
    prior = ("fixed per-class counts (--per-class)" if options.per_class is not None
             else {"spec": file_name(options.class_prior), "weights": options.prior_weights(class_names)})
    return {
        "num_images": int(len(labels)), "seed": options.seed,
        "image_size": options.image_size or gan.shape.image_size, "channels": gan.shape.channels,
        "resampled_from": gan.shape.image_size if options.image_size not in (None, gan.shape.image_size) else None,
        "class_counts": per_class(labels), "split_counts": {p.name: per_class(p.labels) for p in plans},
        "class_prior": prior, "generator": generator,
        "generator_counts": {"G1": int((generators == 0).sum()), "G2": int((generators == 1).sum())},
        "formats": list(options.formats),
        "class_folders": class_folders(class_names) if "imagefolder" in options.formats else [],
        "files": files, "device": options.device,
        "options": {k: file_name(v) if k in ("audit_report", "class_prior", "checkpoint") else v
                    for k, v in asdict(options).items() if k not in ("overwrite",)},
        "command": command_line(options, checkpoint, run_root, out),
    }


def file_name(value: str | None) -> str | None:
    """An option's file or folder, by name only: the datasheet travels with the data, paths at the site
    do not (a --class-prior of weights, or "uniform", is no path and stays)."""
    is_path = value is not None and ("/" in value or Path(value).expanduser().exists())
    return Path(value).name if is_path else value


def command_line(options: ExportOptions, checkpoint: Path, run_root: Path, out: Path) -> str:
    """A ``fedpggan export`` call that recreates these exact bytes (pinned to the checkpoint), with
    the run, the output and any option file named without their folders."""
    args = ["fedpggan", "export", run_root.resolve().name, "--out", out.resolve().name, "--checkpoint", checkpoint.name]
    if options.per_class is not None:
        args += ["--per-class", ",".join(map(str, options.per_class))]
    else:
        args += ["--n", str(options.n or DEFAULT_N), "--class-prior", file_name(options.class_prior)]
    args += ["--generator", options.generator, "--seed", str(options.seed), "--format", ",".join(options.formats),
             "--split", "/".join(f"{f:g}" for f in options.split), "--device", options.device]
    if options.image_size is not None:
        args += ["--image-size", str(options.image_size)]
    if options.audit_report is not None:
        args += ["--audit-report", file_name(options.audit_report)]
    args += [flag for flag, on in (("--allow-unaudited", options.allow_unaudited),
                                   ("--allow-no-dp", options.allow_no_dp)) if on]
    return shlex.join(args)
