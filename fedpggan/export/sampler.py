"""Images for a range of planned indices, from the EMA generators, reproducibly.

Latents come in fixed blocks of ``LATENT_BLOCK`` images, each from its own seeded
``torch.Generator`` (seed derived from the export seed and the block number), so image i
gets the same latent whatever the chunk size, and no global RNG state is read or changed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fedpggan.build import derived_seed
from fedpggan.export.plan import SplitPlan
from fedpggan.plots import to_uint8
from pggan_model import PGGAN

LATENT_BLOCK = 256
LATENT_STREAM = 2


def latents(start: int, stop: int, dim: int, seed: int) -> torch.Tensor:
    """Latent vectors of global image indices ``start..stop-1`` (CPU, float32)."""
    parts = []
    for block in range(start // LATENT_BLOCK, (stop - 1) // LATENT_BLOCK + 1):
        rng = torch.Generator().manual_seed(derived_seed(seed, LATENT_STREAM, block))
        z = torch.randn(LATENT_BLOCK, dim, generator=rng)
        lo, hi = block * LATENT_BLOCK, (block + 1) * LATENT_BLOCK
        parts.append(z[max(start, lo) - lo: min(stop, hi) - lo])
    return torch.cat(parts)


@torch.no_grad()
def sample_chunk(gan: PGGAN, plan: SplitPlan, lo: int, hi: int, seed: int,
                 image_size: int | None) -> np.ndarray:
    """uint8 images for rows ``lo..hi-1`` of ``plan``: (n,H,W) grayscale or (n,H,W,3) RGB."""
    device = next(gan.parameters()).device
    z = latents(plan.start + lo, plan.start + hi, gan.shape.latent_dim, seed).to(device)
    labels = torch.from_numpy(plan.labels[lo:hi].astype(np.int64)).to(device)
    first_g2 = int((plan.generators[lo:hi] == 0).sum())  # G1's rows come first (see plan.py)
    parts = [(net, slice(a, b)) for net, a, b in ((gan.ema1, 0, first_g2), (gan.ema2, first_g2, hi - lo)) if b > a]
    images = torch.cat([net.eval()(z[rows], labels[rows]) for net, rows in parts])
    if image_size is not None and image_size != gan.shape.image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                               align_corners=False, antialias=True)
    pixels = to_uint8(images).numpy()
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels
