"""One-shot DP release of a site's class-conditional mean embedding (as in DP-MERF).

Privacy assumptions:
- each record contributes a vector of norm exactly 1 to the released sum (see
  pggan_model.mean_embedding.record_sum), so under add/remove adjacency the sum has L2
  sensitivity 1;
- Gaussian noise of std ``noise_multiplier`` is added once: the Gaussian mechanism, which the
  accountant records as the history entry (noise_multiplier, sample rate 1, 1 step) and
  composes with the site's DP-SGD steps;
- the random features come from a public seed, a data-independent length scale and blur.
The release is made once per site and reused every round (never re-drawn).
"""

from __future__ import annotations

import math

import torch

from fedpggan.errors import FedPGGANError
from fedpggan.privacy.accounting import MAX_SIGMA, History, UnreachableBudget, calibrate_noise
from fedpggan.privacy.noise import SecretNoise, SeededNoise
from pggan_model.mean_embedding import RandomFourierFeatures, record_sum

FEATURE_SEED_OFFSET = 7_919  # the features' seed is the run seed + this (public)


def features_for(image_shape: tuple[int, int, int], num_frequencies: int, seed: int, blur: float = 0.0) -> RandomFourierFeatures:
    """The random features every site and the server share for a run (images of ``image_shape`` = (C, H, W))."""
    return RandomFourierFeatures(math.prod(image_shape), num_frequencies, seed + FEATURE_SEED_OFFSET,
                                 image_shape=image_shape, blur=blur)


def release_entry(noise_multiplier: float) -> tuple[float, float, int]:
    """The accountant history entry of one release: a Gaussian mechanism, no subsampling."""
    return (noise_multiplier, 1.0, 1)


def release_noise(epsilon: float, share: float, delta: float, accountant: str) -> float:
    """Noise for a release that alone costs ``share`` of the site's epsilon. A share too small for
    the accountant is reported in the options that set it: fewer DP-SGD steps cannot help it."""
    try:
        return calibrate_noise(epsilon * share, delta, 1.0, 1, accountant)
    except UnreachableBudget:
        raise FedPGGANError(
            f"--epsilon {epsilon:g} with --embedding-share {share:g} leaves {epsilon * share:.3g} for the embedding "
            f"release, which the {accountant} accountant certifies for no noise level up to {MAX_SIGMA:g} at delta "
            f"{delta:.3g}; raise --epsilon or --embedding-share (or make no release: --embedding-weight 0)") from None


def release_history(noise_multiplier: float | None) -> History:
    return [] if noise_multiplier is None else [release_entry(noise_multiplier)]


def release_sum(features: RandomFourierFeatures, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                count_share: float, noise_multiplier: float | None, noise: SecretNoise | SeededNoise | None) -> torch.Tensor:
    """The noisy sum of v(x, y) over the site's records (exact when noise_multiplier is None: no DP);
    its noise is drawn from ``noise`` (fedpggan.privacy.noise: a secret stream unless the run is seeded)."""
    total = record_sum(features, images, labels, num_classes, count_share)
    if noise_multiplier is not None:
        total += noise_multiplier * noise.normal(total.shape, total.dtype)
    return total
