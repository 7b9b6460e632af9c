"""Class-conditional kernel mean embeddings with random Fourier features (as in DP-MERF).

An auxiliary generator loss: the squared distance between the mean random-feature embedding
of generated images of class k and that of the real images of class k (an MMD with a
Gaussian kernel). The real-side embedding is released once per site with the Gaussian
mechanism (fedpggan.privacy.feature_release); here everything is plain PyTorch.

Each record (x, y) maps to v = [a phi(x), b] placed in column y, with phi the unit-norm random
Fourier features and a^2 + b^2 = 1, so ||v|| = 1 for every record (sensitivity 1 of the sum); the
last row counts records per class, which turns sums into class means. b^2 is the *count share*.
The noise on the sum is isotropic, so the count share trades the error of the counts against
that of the D-dimensional feature sums: the class-mean error^2 is about sigma^2 (D / a^2 +
|mean|^2 / b^2) / n^2, smallest near b^2 = 1 / (sqrt(D) + 1) (0.03 for D = 1000). An even split
(b^2 = 1/2) spends half the sensitivity on a single number; a small b^2 leaves small classes
with noisy counts, and a count near zero blows a class mean up.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class RandomFourierFeatures:
    """phi(x) = [cos(Wx), sin(Wx)] / sqrt(D) with W ~ N(0, 1 / length_scale^2): unit norm.

    W is drawn from a public seed, so every site and the server build the same features.
    The length scale defaults to half the root of the pixel count, a data-independent
    stand-in for the median heuristic (which would read private data).

    ``blur`` > 0 smooths each frequency as an image (Gaussian, that many pixels, norm kept):
    w . x then reads the low-pass of x. White frequencies weigh every spatial frequency alike,
    so "the mean image plus pixel noise" matches their mean embedding almost as well as real
    images do (the generators learn noise textures), and most of their energy sits where the
    classes do not differ. Still data-independent: the privacy of a release is unchanged.
    """

    def __init__(self, input_dim: int, num_frequencies: int, seed: int, length_scale: float | None = None,
                 image_shape: tuple[int, int, int] | None = None, blur: float = 0.0) -> None:
        self.length_scale = length_scale or 0.5 * math.sqrt(input_dim)
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(input_dim, num_frequencies, generator=gen) / self.length_scale
        if blur > 0:
            if image_shape is None or math.prod(image_shape) != input_dim:
                raise ValueError(f"blurred frequencies need the image shape (C, H, W) of the {input_dim} inputs")
            self.weight = blurred_columns(self.weight, image_shape, blur)
        self.num_frequencies = num_frequencies

    @property
    def dim(self) -> int:
        return 2 * self.num_frequencies

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        proj = images.flatten(1) @ self.weight.to(images.device, images.dtype)
        return torch.cat([proj.cos(), proj.sin()], dim=1) / math.sqrt(self.num_frequencies)


def blurred_columns(weight: torch.Tensor, image_shape: tuple[int, int, int], sigma: float) -> torch.Tensor:
    """Each column of ``weight`` seen as a (C, H, W) image, Gaussian-blurred (std ``sigma`` pixels,
    reflected borders) and rescaled to its former norm."""
    radius = min(math.ceil(3 * sigma), min(image_shape[1:]) - 1)
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=weight.dtype) ** 2 / (2 * sigma**2))
    taps /= taps.sum()
    images = weight.T.reshape(-1, *image_shape)
    flat = images.reshape(-1, 1, *image_shape[1:])
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), taps.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), taps.view(1, 1, -1, 1))
    blurred = flat.reshape(len(images), -1)
    blurred *= weight.norm(dim=0).unsqueeze(1) / blurred.norm(dim=1, keepdim=True)
    return blurred.T.contiguous()


def split_weights(count_share: float) -> tuple[float, float]:
    """(a, b): the weights of the features and of the count in a record's unit vector [a phi, b]."""
    if not 0 < count_share < 1:
        raise ValueError(f"count share {count_share} must be in (0, 1)")
    return math.sqrt(1.0 - count_share), math.sqrt(count_share)


def record_sum(features: RandomFourierFeatures, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
               count_share: float, chunk: int = 1024) -> torch.Tensor:
    """Sum over records of v(x, y): a (features.dim + 1, num_classes) matrix; each record adds
    a vector of norm exactly 1, so adding or removing one record moves the sum by at most 1."""
    a, b = split_weights(count_share)
    total = torch.zeros(features.dim + 1, num_classes, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x, y = images[start : start + chunk], labels[start : start + chunk]
        v = torch.cat([a * features(x.double()), b * torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        v = v / v.norm(dim=1, keepdim=True).clamp(min=1.0)  # rounding can never lift a norm above 1
        total.index_add_(1, y.cpu(), v.cpu().T)
    return total


def class_means(released_sum: torch.Tensor, count_share: float, min_count: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-class mean embeddings (dim, K), estimated class counts (K,)) from a (noisy) sum
    made with ``count_share``."""
    a, b = split_weights(count_share)
    counts = released_sum[-1] / b
    means = released_sum[:-1] / a / counts.clamp(min=min_count)
    return means.float(), counts.float()


def release_noise_ratio(released_sum: torch.Tensor, count_share: float, noise_variance: float) -> float:
    """Estimated worst, over classes k, of (noise of k's mean) / (distance from k's mean to the
    nearest other class mean) of a pooled release whose every coordinate carries Gaussian noise
    of ``noise_variance`` (the sum of the pooled sites' sigma^2; 0 without DP). The nearest class,
    not the farthest: a small class lost in the noise next to a similar one (BreastMNIST's
    malignant next to benign) must close the gate even when other classes lie far apart.
    Post-processing: it reads the release and the public noise levels only. The distances are
    de-biased by the expected noise; a class that does not stand out of it gives inf."""
    if noise_variance <= 0:
        return 0.0
    if released_sum.shape[1] < 2:
        return math.inf
    means, counts = (t.double() for t in class_means(released_sum, count_share))
    a, _ = split_weights(count_share)
    noise_sq = noise_variance * means.shape[0] / (a * counts.clamp(min=1.0)) ** 2  # E||noise of class k's mean||^2
    gaps = torch.cdist(means.T, means.T) ** 2 - noise_sq[:, None] - noise_sq[None, :]
    nearest_sq = gaps.fill_diagonal_(math.inf).min(dim=1).values  # per class, to its nearest other class
    if bool((nearest_sq <= 0).any()):
        return math.inf
    return float((noise_sq / nearest_sq).max().sqrt())


def vouched_classes(counts: torch.Tensor, count_share: float, noise_variance: float, sigmas: float = 2.0) -> torch.Tensor:
    """Per class, whether a pooled release's noisy count (``class_means``' counts) stands ``sigmas`` standard
    deviations above zero. A class no pooled site holds has a count of pure noise, and its "mean" (noise over
    that count) is a target far outside the data (post-processing of the release and the public noise levels)."""
    _, b = split_weights(count_share)
    return counts > max(sigmas * math.sqrt(noise_variance) / b, 0.5)


def embedding_loss(features: RandomFourierFeatures, images: torch.Tensor, labels: torch.Tensor,
                   target_means: torch.Tensor, classes: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over the classes in the batch of ||mean phi(G(z, k)) - target mean of class k||^2; a class
    that ``classes`` (a boolean per class) marks False has no target and adds nothing."""
    phi = features(images)
    loss = images.new_zeros(())
    for k in labels.unique():
        if classes is not None and not bool(classes[k]):
            continue
        mask = labels == k
        loss = loss + (phi[mask].mean(0) - target_means[:, k].to(phi)).pow(2).sum()
    return loss
