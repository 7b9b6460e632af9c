"""A built-in, offline, procedurally generated "medical-looking" dataset.

Each image is a textured elliptical organ on a darker, noisy background with a smooth
intensity gradient. Class 0 has no lesion; class k > 0 adds 1-3 lesions of one kind
(bright blob, bright ring or dark cyst), so classes differ in a way a small CNN can see
and GAN quality checks have a meaningful target. It runs without downloads, so tests and
demos work anywhere; it is not medical data (``is_medical`` is False).
"""

from __future__ import annotations

import numpy as np
import torch

from fedpggan.data.dataset import ImageDataset, to_model_range
from fedpggan.errors import FedPGGANError

CLASS_NAMES = ["no lesion", "lesion", "2 lesions", "3 lesions", "ring lesion", "2 ring lesions",
               "3 ring lesions", "cyst", "2 cysts", "3 cysts"]
DEFAULT_NUM_CLASSES = 2
DEFAULT_SIZES = {"train": 2000, "val": 400, "test": 400}
SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}  # a different random stream per split
MAX_LESIONS = 3
ORGAN_TINT = np.array([1.0, 0.78, 0.84], dtype=np.float32)   # RGB variant: pink tissue,
LESION_TINT = np.array([0.65, 0.3, 1.0], dtype=np.float32)   # purple lesions


def open_phantom(split: str = "train", n: int | None = None, image_size: int = 28,
                 num_classes: int = DEFAULT_NUM_CLASSES, channels: int = 1, seed: int = 0) -> ImageDataset:
    """``n`` images (default per split: 2000/400/400) with balanced, shuffled labels."""
    if split not in SPLIT_STREAM:
        raise FedPGGANError(f"phantom: split {split!r} unknown; choose train, val or test")
    n = DEFAULT_SIZES[split] if n is None else n
    if not 2 <= num_classes <= len(CLASS_NAMES):
        raise FedPGGANError(f"phantom: {num_classes} classes requested; it supports 2..{len(CLASS_NAMES)}")
    if channels not in (1, 3):
        raise FedPGGANError(f"phantom: {channels} channels requested; use 1 (grayscale) or 3 (RGB)")
    if n < num_classes or image_size < 8 or seed < 0:
        raise FedPGGANError(f"phantom: needs n >= {num_classes} images, --image-size >= 8 and --seed >= 0 "
                            f"(got n={n}, image size {image_size}, seed {seed})")
    rng = np.random.default_rng([seed, SPLIT_STREAM[split]])
    labels = rng.permutation(np.arange(n) % num_classes)
    pixels = _render(labels, image_size, channels, rng)
    return ImageDataset(to_model_range(pixels, None), torch.from_numpy(labels.astype(np.int64)),
                        CLASS_NAMES[:num_classes], "phantom", False, "built-in (procedural)")


def _render(labels: np.ndarray, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """float32 pixels in [0,1], (N,S,S) or (N,S,S,3); all images drawn at once."""
    n = len(labels)

    def u(lo: float, hi: float, *shape: int) -> np.ndarray:
        return rng.uniform(lo, hi, (n, *shape)).astype(np.float32)[..., None, None]

    g = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1     # pixel centres in [-1,1]
    yy, xx = g[:, None], g[None, :]
    pixel = 2.0 / size

    tilt = u(0, 2 * np.pi)
    background = u(0.05, 0.15) + 0.08 * (np.cos(tilt) * xx + np.sin(tilt) * yy)

    cx, cy, rot = u(-0.1, 0.1), u(-0.1, 0.1), u(0, np.pi)
    a, b = u(0.6, 0.8), u(0.45, 0.62)
    xr = (xx - cx) * np.cos(rot) + (yy - cy) * np.sin(rot)
    yr = (yy - cy) * np.cos(rot) - (xx - cx) * np.sin(rot)
    organ = _sigmoid((1 - np.sqrt((xr / a) ** 2 + (yr / b) ** 2)) * b / pixel)
    wave_dir, freq, phase = u(0, np.pi, 3), u(4, 10, 3), u(0, 2 * np.pi, 3)
    texture = 0.04 * np.sin(freq * (np.cos(wave_dir) * xx[None] + np.sin(wave_dir) * yy[None]) + phase).sum(1)
    tissue = background + organ * (u(0.42, 0.55) + texture - background)

    lesions = organ * _lesions(labels, (cx, cy, rot, a, b), xx, yy, pixel, rng)
    noise = rng.normal(0, 0.025, (n, size, size, channels)).astype(np.float32)
    if channels == 1:
        out = tissue + lesions + noise[..., 0]
    else:
        out = tissue[..., None] * ORGAN_TINT + lesions[..., None] * LESION_TINT + noise
    return np.clip(out, 0.0, 1.0)


def _lesions(labels: np.ndarray, organ: tuple[np.ndarray, ...], xx: np.ndarray, yy: np.ndarray,
             pixel: float, rng: np.random.Generator) -> np.ndarray:
    """Signed lesion intensity (N,S,S): class k>0 has (k-1)%3+1 lesions of kind (k-1)//3
    (0 bright blob, 1 bright ring, 2 dark cyst), spread evenly around the organ centre."""
    cx, cy, rot, a, b = (v[:, :, 0] for v in organ)                        # (N,1) each
    n = len(labels)
    count = np.where(labels > 0, (labels - 1) % 3 + 1, 0)
    kind = np.where(labels > 0, (labels - 1) // 3, 0)
    angle = rng.uniform(0, 2 * np.pi, (n, 1)) + 2 * np.pi * np.arange(MAX_LESIONS) / np.maximum(count, 1)[:, None]
    radius = np.where(count[:, None] > 1, rng.uniform(0.45, 0.55, (n, 1)), rng.uniform(0.0, 0.35, (n, 1)))
    lx, ly = radius * a * np.cos(angle), radius * b * np.sin(angle)          # organ frame, (N,3)
    px = (cx + lx * np.cos(rot) - ly * np.sin(rot)).astype(np.float32)
    py = (cy + lx * np.sin(rot) + ly * np.cos(rot)).astype(np.float32)
    r = rng.uniform(0.13, 0.17, (n, MAX_LESIONS)).astype(np.float32)
    strength = rng.uniform(0.3, 0.4, (n, MAX_LESIONS)).astype(np.float32) * np.where(kind == 2, -0.8, 1.0)[:, None]
    out = np.zeros((n, xx.shape[1], yy.shape[0]), dtype=np.float32)
    for slot in range(MAX_LESIONS):                    # only images that have this lesion
        for ring in (False, True):
            i = np.flatnonzero((count > slot) & ((kind == 1) == ring))
            rr = r[i, slot, None, None]
            d = np.sqrt((xx - px[i, slot, None, None]) ** 2 + (yy - py[i, slot, None, None]) ** 2)
            if ring:
                shape = np.exp(-(((d - 1.5 * rr) / np.maximum(0.4 * rr, 0.6 * pixel)) ** 2))
            else:
                shape = _sigmoid((rr - d) / (0.5 * pixel))
            out[i] += shape * strength[i, slot, None, None]
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))
