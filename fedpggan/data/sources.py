"""``--dataset SPEC`` -> :class:`ImageDataset`: one option for every kind of source."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from fedpggan.data.dataset import ImageDataset
from fedpggan.data.folder import load_folder
from fedpggan.data.medmnist import MEDMNIST, resolve
from fedpggan.data.npz import load_npz
from fedpggan.data.phantom import open_phantom
from fedpggan.errors import FedPGGANError

NOT_MEDICAL = " (not medical data)"  # appended to a run's dataset name in run.json

SPLITS = ("train", "val", "test")
DEFAULT_IMAGE_SIZE = 28


def open_dataset(spec: str, split: str = "train", data_dir: str | None = None,
                 image_size: int | None = None, seed: int = 0, named_by: str = "--dataset") -> ImageDataset:
    """Open ``split`` of ``spec``: a MedMNIST name, an ``.npz`` path, an ImageFolder directory
    or ``phantom``. ``image_size`` resizes (None keeps npz images as stored, 28 otherwise);
    ``seed`` only affects the generated phantom. ``named_by`` is where the user wrote ``spec``
    (a flag, a site's config key), so that a spec that names nothing says what to fix."""
    if split not in SPLITS:
        raise FedPGGANError(f"split {split!r}: unknown; choose train, val or test")
    if image_size is not None and image_size < 4:
        raise FedPGGANError(f"--image-size {image_size}: must be >= 4")
    if spec.lower() == "phantom":
        return open_phantom(split, image_size=image_size or DEFAULT_IMAGE_SIZE, seed=seed)
    if spec.lower() in MEDMNIST:
        name = spec.lower()
        return load_npz(resolve(name, data_dir, image_size), split, name, image_size)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_folder(path, split, spec, image_size or DEFAULT_IMAGE_SIZE)
    if path.is_file():
        return load_npz(path, split, spec, image_size)
    raise FedPGGANError(f"{spec}: no such file or folder, nor a MedMNIST name ({', '.join(MEDMNIST)}) or "
                        f"'phantom'; set {named_by} to an .npz file in MedMNIST layout or an ImageFolder directory")


def run_dataset_name(name: str, is_medical: bool) -> str:
    """The dataset's name as run.json records it: data that are not medical say so."""
    return name if is_medical else name + NOT_MEDICAL


SITE_DATA = "site data"  # what public_name calls a hospital's own data


def common_public_name(names: Iterable[str]) -> str:
    """One name for the sites' data: the name they all give, else "site data" (one site's
    benchmark name would misstate the others' data in run.json, the datasheet and `evaluate`)."""
    unique = set(names)
    return unique.pop() if len(unique) == 1 else SITE_DATA


def public_name(spec: str) -> str:
    """The dataset's name as a site may tell the coordinator: a public benchmark's name (a
    MedMNIST name or phantom, also as the stem of an .npz file such as pneumoniamnist_64.npz,
    or as run.json records it), else "site data". A path names the hospital's own storage and
    can itself be sensitive, so it never leaves the site."""
    stem = re.sub(r"_\d+$", "", Path(spec.removesuffix(NOT_MEDICAL)).name.lower().removesuffix(".npz"))
    return stem if stem in MEDMNIST or stem == "phantom" else SITE_DATA
