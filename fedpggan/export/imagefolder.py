"""The torchvision ``ImageFolder`` layout: ``images/[<split>/]<label>_<class name>/<row>.png``.

Folder names start with the zero-padded label id because ImageFolder numbers classes in
alphabetical order: the prefix makes that order the run's label order, so folder datasets and
the npz agree on every class id. The file name is the image's row in ``<split>_images``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def class_folders(class_names: list[str]) -> list[str]:
    """Filesystem-safe, distinct, label-ordered folder names, e.g. ``1_normal_benign``."""
    width = len(str(len(class_names) - 1))
    return [f"{k:0{width}d}_{UNSAFE.sub('_', name).strip('._') or 'class'}" for k, name in enumerate(class_names)]


class ImageFolderWriter:
    """Writes PNGs of one export; PNG bytes depend only on the pixels (no timestamps)."""

    def __init__(self, root: Path, class_names: list[str], splits: list[str], total: int) -> None:
        self.folders = class_folders(class_names)
        self.digits = max(5, len(str(total - 1)))
        self.roots = {s: root / s if len(splits) > 1 or s != "train" else root for s in splits}
        for split_root in self.roots.values():
            for folder in self.folders:
                (split_root / folder).mkdir(parents=True, exist_ok=True)

    def write(self, split: str, first_row: int, images: np.ndarray, labels: np.ndarray) -> None:
        for row, (pixels, label) in enumerate(zip(images, labels), start=first_row):
            path = self.roots[split] / self.folders[int(label)] / f"{row:0{self.digits}d}.png"
            Image.fromarray(pixels).save(path, format="PNG")
