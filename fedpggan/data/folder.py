"""ImageFolder layout: one sub-folder per class, optionally under train/val/test folders.

This is how hospitals typically export images, so it lets users bring their own data
without converting it to npz first.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from fedpggan.data.dataset import ImageDataset, to_model_range
from fedpggan.errors import FedPGGANError

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"}  # 8 bits per channel: RGB loses no depth
LUMINANCE = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's convert("L")
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}  # compared in lower case
CHUNK = 32  # images held at full size at a time (32 RGB scans of 1024x1024: 0.4 GB as float)


# A file name can be a patient number: what a site tells the coordinator of a bad image names none (client/site.py).
NAMED_IN_LOG = "the site's log names it"


def load_folder(root: str | Path, split: str, name: str, image_size: int) -> ImageDataset:
    """Load ``split``; grayscale (1 channel) when every training image has R == G == B, else RGB.

    The train split decides for every split: a model trained on one channel count must be
    evaluated on the same (a grey test image then gets 3 equal channels; a colour one in a grey
    data set, its luminance)."""
    root = Path(root)
    has_splits = (root / "train").is_dir()
    if not has_splits and split != "train":
        raise FedPGGANError(f"{root}: has no train/val/test sub-folders, so it only has a train split; "
                            f"add {root}/train and {root}/{split} folders to use '{split}'")
    split_dir = root / split if has_splits else root
    if not split_dir.is_dir():
        raise FedPGGANError(f"{root}: has no '{split}' sub-folder; add that folder with one sub-folder per class")
    class_names = _classes(root / "train" if has_splits else root)  # every split uses train's classes
    if extra := sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not _hidden(p.name)
                       and p.name not in class_names):
        raise FedPGGANError(f"{split_dir / extra[0]}: class '{extra[0]}' has no folder under {root / 'train'}, so the "
                            "model cannot learn it; add its training images or remove the folder",
                            shared=f"<data-path>: a folder of the '{split}' split is no training class; {NAMED_IN_LOG}")
    files, labels = _split_files(split_dir, class_names, split)
    # Read and resized CHUNK images at a time: a folder of full-size scans never sits in memory at full size.
    to_grey = None if split == "train" else _train_split_is_grey(str(root.resolve()), tuple(class_names))
    parts, all_grey, stored_size = [], True, None
    for pixels in _chunks(files, CHUNK):
        stored_size = pixels.shape[1]
        grey = _is_grey(pixels)
        all_grey = all_grey and grey  # the train split is grey if every one of its images is
        if to_grey or (to_grey is None and all_grey):
            pixels = pixels[..., 0] if grey else np.rint(pixels @ LUMINANCE).astype(np.uint8)
        parts.append(to_model_range(pixels, image_size))
    if to_grey is None and not all_grey:  # the train split's chunks read before its first colour image
        parts = [p.expand(-1, 3, -1, -1) if p.shape[1] == 1 else p for p in parts]
    images = torch.cat(parts)
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), class_names, name, True, str(root.resolve()),
                        stored_size)


def _split_files(split_dir: Path, class_names: list[str], split: str) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for label, cls in enumerate(class_names):
        found = _images_in(split_dir / cls)  # none: a site of a federated run may hold no image of a class
        files += found
        labels += [label] * len(found)
    if not files:
        raise FedPGGANError(f"{split_dir}: no images found; expected one sub-folder of images per class",
                            shared=f"<data-path>: no images in the '{split}' split")
    return files, labels


@functools.lru_cache(maxsize=8)  # evaluate opens train and test: the train split is read once for both
def _train_split_is_grey(root: str, class_names: tuple[str, ...]) -> bool:
    return all(_is_grey(pixels) for pixels in _chunks(_split_files(Path(root) / "train", list(class_names), "train")[0], CHUNK))


def _is_grey(pixels: np.ndarray) -> bool:
    return bool((pixels[..., :1] == pixels).all())


def _classes(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))
    if not names:
        raise FedPGGANError(f"{folder}: no class sub-folders; expected one sub-folder of images per class",
                            shared="<data-path>: no class sub-folders")
    if split_like := [n for n in names if n.lower() in SPLIT_NAMES]:
        # e.g. Training/ and Testing/: read as two classes they would merge every real class, and train on the test images
        raise FedPGGANError(f"{folder}: folder(s) {', '.join(split_like)} look like data splits, not classes; splits are read "
                            "only from folders named train, val and test (lower case): rename them",
                            shared=f"<data-path>: folder(s) {', '.join(split_like)} look like data splits, not classes")
    return names


def _images_in(folder: Path) -> list[Path]:
    """Image files under ``folder``, at any depth, except hidden ones (a .trash folder, macOS' ._ files)."""
    if not folder.is_dir():
        return []
    if not os.access(folder, os.R_OK | os.X_OK):  # rglob would skip it silently and report no images
        raise FedPGGANError(f"{folder}: not readable by this user (uid {os.getuid()}); give it read access (a site "
                            "container runs as uid 49999: chmod -R o+rX, or chown the data to that user)",
                            shared=f"<data-path>: a class folder is not readable by the site's user; {NAMED_IN_LOG}")
    try:
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                      and not any(_hidden(part) for part in p.relative_to(folder).parts))
    except OSError as exc:  # a sub-folder readable but not searchable, a file gone mid-listing
        raise FedPGGANError(f"{folder}: cannot be listed ({exc}); give the site's user read access to every folder below it",
                            shared=f"<data-path>: a folder of images cannot be listed ({type(exc).__name__}); "
                                   f"{NAMED_IN_LOG}") from exc


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _chunks(files: list[Path], size: int) -> Iterator[np.ndarray]:
    """The images, ``size`` at a time, as uint8 (n,H,W,3); they must be 8-bit, square and all of
    the first image's size."""
    first: tuple[Path, tuple[int, ...]] | None = None
    for start in range(0, len(files), size):
        arrays = []
        for f in files[start:start + size]:
            arrays.append(_read_one(f))
            first = first or (f, arrays[-1].shape)
            if arrays[-1].shape != first[1]:
                h, w = arrays[-1].shape[:2]
                h0, w0 = first[1][:2]
                raise FedPGGANError(f"{f}: is {w}x{h} but {first[0]} is {w0}x{h0}; "
                                    "resize all images of the folder to one size first",
                                    shared=f"<data-path>: an image is {w}x{h}, another {w0}x{h0}; {NAMED_IN_LOG}")
        yield np.stack(arrays)


def _read_one(f: Path) -> np.ndarray:
    """One 8-bit square image as uint8 (H,W,3)."""
    try:
        with Image.open(f) as img:
            if img.mode not in EIGHT_BIT_MODES:  # converting would clip 16-bit values and zero floats silently
                raise FedPGGANError(f"{f}: a {img.mode} image (more than 8 bits per channel); convert the folder's "
                                    "images to 8-bit PNG first, with the window/level you want the model to see",
                                    shared=f"<data-path>: an image has more than 8 bits per channel; {NAMED_IN_LOG}")
            array = np.asarray(img.convert("RGB"))
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise FedPGGANError(f"{f}: not a readable image ({exc}); fix or remove it",
                            shared=f"<data-path>: an image is not readable ({type(exc).__name__}); {NAMED_IN_LOG}") from exc
    h, w = array.shape[:2]
    if h != w:
        raise FedPGGANError(f"{f}: is {w}x{h}; expected square images: crop them first (resizing would distort them)",
                            shared=f"<data-path>: an image is {w}x{h}, not square; {NAMED_IN_LOG}")
    return array
