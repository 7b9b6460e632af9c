"""The one in-memory dataset type every loader returns, and the pixel conversion they share.

Medical image sets used here are small (MedMNIST: thousands of 28x28 images), so holding
them as one float tensor keeps loading, partitioning and DP sampling simple and fast.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fedpggan.errors import FedPGGANError


class ImageDataset(Dataset):
    """In-memory labelled images. ``__getitem__`` -> (float32 tensor (C,H,W) in [-1,1], int label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                 name: str, is_medical: bool, source: str, stored_size: int | None = None) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
        self.images = images.to(torch.float32)
        self.labels = labels.to(torch.int64)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.name = name
        self.is_medical = is_medical
        self.source = source
        self.stored_size = stored_size or self.image_size  # the images' side in their files, before any resize

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        return (self.channels, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    @functools.cached_property
    def sha256(self) -> str:
        """Content hash of the images and labels (the dataset is never changed in place): what a
        site's DP draws are keyed to, so other data never reuse a draw (client/site_round.py)."""
        h = hashlib.sha256()
        for tensor in (self.images, self.labels):
            h.update(str(tuple(tensor.shape)).encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageDataset:
        """The selected rows with the same metadata (e.g. one federated site's share)."""
        idx = torch.as_tensor(np.asarray(indices))
        idx = idx if idx.dtype == torch.bool else idx.long()   # a mask or positions
        return ImageDataset(self.images[idx], self.labels[idx], self.class_names,
                            self.name, self.is_medical, self.source)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def in_class_order(self, names: Sequence[str], option: str) -> ImageDataset:
        """These images with the class ids of ``names`` (a run's classes): an ImageFolder numbers its
        classes alphabetically, a MedMNIST file by label id, so the same classes can carry other ids.
        Names decide; generic names (class_0, ...) say nothing, and other names that differ are
        refused in one line naming ``option``: every figure measured on them would be wrong."""
        names = [str(n) for n in names]
        if not names or names == self.class_names or generic_names(names) or generic_names(self.class_names):
            return self
        if sorted(names) != sorted(self.class_names):
            raise FedPGGANError(f"{option} {self.name}: classes {self.class_names}, but the run was trained on {names}; "
                                f"give {option} data of the run's classes (an ImageFolder's class folders named as in run.json)")
        new_id = torch.tensor([names.index(name) for name in self.class_names])
        return ImageDataset(self.images, new_id[self.labels], names, self.name, self.is_medical, self.source)

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, n={len(self)}, shape=({self.channels},"
                f"{self.image_size},{self.image_size}), classes={self.class_names})")


def generic_names(names: Sequence[str]) -> bool:
    """Names the npz loader gives classes it knows nothing of (class_0, class_1, ...)."""
    return all(str(name) == f"class_{k}" for k, name in enumerate(names))


def to_model_range(pixels: np.ndarray, image_size: int | None) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) pixels, (N,H,W) or (N,H,W,C) -> float32 (N,C,S,S) in
    [-1,1], resized to ``image_size``.

    Resizing happens on float images with antialiasing so downscaled images do not alias."""
    x = torch.from_numpy(np.ascontiguousarray(pixels))
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.to(torch.float32) / 127.5 - 1.0 if x.dtype == torch.uint8 else x.to(torch.float32) * 2.0 - 1.0
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear",
                          align_corners=False, antialias=True).clamp_(-1.0, 1.0)  # float rounding
    return x.contiguous()
