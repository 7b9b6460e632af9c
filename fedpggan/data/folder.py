"""ImageFolder layout: one sub-folder per class, optionally under train/val/test folders.

This is how hospitals typically export images, so it lets users bring their own data
without converting it to npz first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fedpggan.data.dataset import ImageDataset, to_model_range
from fedpggan.errors import FedPGGANError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


def load_folder(root: str | Path, split: str, name: str, image_size: int) -> ImageDataset:
    """Load ``split``; grayscale (1 channel) when every image has R == G == B, else RGB."""
    root = Path(root)
    has_splits = (root / "train").is_dir()
    if not has_splits and split != "train":
        raise FedPGGANError(f"{root}: has no train/val/test sub-folders, so it only has a train split; "
                            f"add {root}/train and {root}/{split} folders to use '{split}'")
    split_dir = root / split if has_splits else root
    if not split_dir.is_dir():
        raise FedPGGANError(f"{root}: has no '{split}' sub-folder; add that folder with one sub-folder per class")
    class_names = _classes(root / "train" if has_splits else root)  # every split uses train's classes
    files, labels = [], []
    for label, cls in enumerate(class_names):
        found = _images_in(split_dir / cls)
        if not found and split == "train":
            raise FedPGGANError(f"{split_dir / cls}: class '{cls}' has no images; add images or remove the folder")
        files += found
        labels += [label] * len(found)
    if not files:
        raise FedPGGANError(f"{split_dir}: no images found; expected one sub-folder of images per class")
    pixels = _read_all(files)
    if (pixels[..., :1] == pixels).all():
        pixels = pixels[..., 0]
    return ImageDataset(to_model_range(pixels, image_size), torch.tensor(labels, dtype=torch.int64),
                        class_names, name, True, str(root.resolve()))


def _classes(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise FedPGGANError(f"{folder}: no class sub-folders; expected one sub-folder of images per class")
    return names


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def _read_all(files: list[Path]) -> np.ndarray:
    """All images as uint8 (N,H,W,3); they must share one size so they can be stacked."""
    arrays = []
    for f in files:
        try:
            with Image.open(f) as img:
                arrays.append(np.asarray(img.convert("RGB")))
        except (OSError, UnidentifiedImageError) as exc:
            raise FedPGGANError(f"{f}: not a readable image ({exc}); fix or remove it") from exc
        if arrays[-1].shape != arrays[0].shape:
            h0, w0 = arrays[0].shape[:2]
            h, w = arrays[-1].shape[:2]
            raise FedPGGANError(f"{f}: is {w}x{h} but {files[0]} is {w0}x{h0}; "
                                "resize all images of the folder to one size first")
    return np.stack(arrays)
