"""Load and validate a MedMNIST-layout npz (``{split}_images`` uint8, ``{split}_labels``).

Every defect a user can fix becomes a one-line :class:`FedPGGANError` that names the file,
because a bad array would otherwise surface much later as a cryptic training crash.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from fedpggan.data.dataset import ImageDataset, to_model_range
from fedpggan.data.medmnist import known_class_names
from fedpggan.errors import FedPGGANError

LAYOUT = "expected a MedMNIST npz with train_images/train_labels/val_images/val_labels/test_images/test_labels"


def load_npz(path: str | Path, split: str, name: str, image_size: int | None) -> ImageDataset:
    """Read ``split`` from the npz at ``path``; the class count comes from the train labels
    (or the MedMNIST table) so that every split of one file agrees on it."""
    path = Path(path)
    if not path.is_file():
        raise FedPGGANError(f"{path}: file not found")
    with open(path, "rb") as head:  # np.load would call any other file pickled data, or return a bare array
        magic = head.read(6)
    if magic.startswith(b"\x93NUMPY"):
        raise FedPGGANError(f"{path}: holds a single array (.npy), not an npz archive; {LAYOUT}")
    if not magic.startswith(b"PK"):
        raise FedPGGANError(f"{path}: not an npz archive (not a zip file); {LAYOUT}")
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in ("train_labels", f"{split}_images", f"{split}_labels"):
                if key not in data.files:
                    raise FedPGGANError(f"{path}: key '{key}' missing (has {', '.join(data.files)}); {LAYOUT}")
            train_labels = _labels(path, "train_labels", data["train_labels"])
            images = data[f"{split}_images"]
            labels = _labels(path, f"{split}_labels", data[f"{split}_labels"])
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, pickle.UnpicklingError,
            NotImplementedError) as exc:  # the last: a damaged zip header naming an unknown zip version
        raise FedPGGANError(f"{path}: unreadable or truncated npz ({_first_line(exc)}); "
                            "download or re-save the file") from exc

    if not train_labels.size:
        raise FedPGGANError(f"{path}: train split is empty; {LAYOUT}")
    _check_images(path, split, images, len(labels))
    names = known_class_names(path.stem)
    num_classes = len(names) if names else int(train_labels.max(initial=-1)) + 1
    if num_classes > len(train_labels):  # every class needs a train image: ids 0..K-1 cannot exceed the images
        raise FedPGGANError(f"{path}: train_labels go up to {num_classes - 1} for {len(train_labels)} images; "
                            "labels must be class ids 0..K-1")
    for key, lab in (("train_labels", train_labels), (f"{split}_labels", labels)):
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise FedPGGANError(f"{path}: {key} has values {lab.min()}..{lab.max()} outside 0..{num_classes - 1}; "
                                "labels must be class ids 0..K-1")
    missing = np.setdiff1d(np.arange(num_classes), train_labels)
    if missing.size:
        raise FedPGGANError(f"{path}: class {int(missing[0])} has no train images; "
                            "renumber labels to 0..K-1 without gaps")
    return ImageDataset(to_model_range(images, image_size), torch.from_numpy(labels),
                        names or [f"class_{k}" for k in range(num_classes)], name, True, str(path.resolve()), images.shape[1])


def _labels(path: Path, key: str, lab: np.ndarray) -> np.ndarray:
    """(N,) or (N,1) integer class ids -> int64 (N,)."""
    if lab.ndim == 2 and lab.shape[1] > 1:
        raise FedPGGANError(f"{path}: {key} has shape {lab.shape}, i.e. multi-label; "
                            "fedpggan needs one class id per image, shape (N,) or (N,1)")
    if lab.ndim not in (1, 2):
        raise FedPGGANError(f"{path}: {key} has shape {lab.shape}; expected (N,) or (N,1) class ids")
    lab = lab.reshape(-1)
    if lab.dtype.kind == "f":
        if not np.isfinite(lab).all():
            raise FedPGGANError(f"{path}: {key} contains NaN or infinite values; every image needs a class id")
        if not np.array_equal(lab, np.round(lab)):
            raise FedPGGANError(f"{path}: {key} has fractional values; expected integer class ids")
    elif lab.dtype.kind not in "iu":
        raise FedPGGANError(f"{path}: {key} has dtype {lab.dtype}; expected integer class ids")
    return lab.astype(np.int64)


def _check_images(path: Path, split: str, images: np.ndarray, n_labels: int) -> None:
    key = f"{split}_images"
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise FedPGGANError(f"{path}: {key} has shape {images.shape}; expected (N,H,W) grayscale or (N,H,W,3) RGB")
    if images.shape[1] != images.shape[2]:
        raise FedPGGANError(f"{path}: {key} are {images.shape[1]}x{images.shape[2]}; expected square images")
    if images.dtype.kind == "f":
        if np.isnan(images).any():
            raise FedPGGANError(f"{path}: {key} contains NaN; fix or drop those images")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise FedPGGANError(f"{path}: float {key} outside 0..1; scale to 0..1 or save as uint8 0..255")
    elif images.dtype != np.uint8:
        raise FedPGGANError(f"{path}: {key} has dtype {images.dtype}; expected uint8 (0..255) or float (0..1)")
    if len(images) != n_labels:
        raise FedPGGANError(f"{path}: {key} has {len(images)} images but {split}_labels has {n_labels}; "
                            "they must match one to one")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
