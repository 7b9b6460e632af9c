"""Membership-inference scores: higher means "more likely a training record".

- white-box, LOGAN-style (Hayes et al. 2019): the discriminator's logit D(x, y). D is the
  only network that touches real records, and an overfit D rates its training images as
  "more real" than unseen ones;
- black-box on released data: minus the L2 distance from x to its nearest synthetic image
  (a generator that memorised records reproduces them; Chen et al. 2020, GAN-Leaks).
"""

from __future__ import annotations

import numpy as np
import torch

from fedpggan.data import ImageDataset
from pggan_model import PGGAN

BATCH = 512


@torch.no_grad()
def discriminator_scores(gan: PGGAN, data: ImageDataset) -> np.ndarray:
    device = next(gan.parameters()).device
    d = gan.d.eval()
    out = [d(data.images[i:i + BATCH].to(device), data.labels[i:i + BATCH].to(device)).float().cpu()
           for i in range(0, len(data), BATCH)]
    return torch.cat(out).numpy().astype(np.float64)


@torch.no_grad()
def synthetic_images(gan: PGGAN, n: int, seed: int) -> torch.Tensor:
    """``n`` released-style samples (EMA generators, both halves), reproducible for ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        images = [gan.sample(min(BATCH, n - i))[0].flatten(1) for i in range(0, n, BATCH)]
    return torch.cat(images)


@torch.no_grad()
def distance_scores(synthetic: torch.Tensor, data: ImageDataset) -> np.ndarray:
    """-min_j ||x - s_j||_2 over the synthetic set, for every record x."""
    out = []
    for i in range(0, len(data), BATCH):
        x = data.images[i:i + BATCH].to(synthetic.device).flatten(1)
        out.append(torch.cdist(x, synthetic).min(dim=1).values.cpu())
    return -torch.cat(out).numpy().astype(np.float64)
