"""Fidelity and diversity of synthetic images, measured in the SmallCNN's feature space.

Why not Inception features (the usual FID): InceptionV3 was trained on 299x299 colour photos
of everyday objects. A 28x28 grayscale X-ray has to be upsampled ~10x and copied into three
channels before it goes in, and the resulting features mostly describe blur and upsampling
artefacts, not anatomy or lesions; such FIDs neither rank medical generators reliably nor
compare across papers. Features of a small classifier trained on the *real* training split
of the same dataset do encode what separates its classes, so distances between real and
synthetic feature clouds say something about the images that matter here. The price: the
numbers are comparable only between runs evaluated with the same dataset and classifier.
"""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from prdc import compute_prdc
from scipy import linalg

from fedpggan.errors import FedPGGANError
from fedpggan.evaluation.classifier import SmallCNN, embed

NEAREST_K = 5
# A class is flagged as collapsed when its synthetic images are spread out less than 30% as
# much as its real images (mean pairwise feature distance). A healthy generator sits near
# 0.6-1.2; identical images give 0; below 0.3 the class is a handful of near-copies.
COLLAPSE_THRESHOLD = 0.3
MAX_PER_CLASS = 500


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D): the FID formula
    ||mu_a - mu_b||^2 + Tr(Ca + Cb - 2 (Ca Cb)^1/2); 0 for identical sets."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():   # ReLU features often have dead dimensions: singular covariances
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():   # regularise as pytorch-fid does
            eye = np.eye(len(cov_a)) * 1e-6
            covmean = linalg.sqrtm((cov_a + eye) @ (cov_b + eye))
    covmean = covmean.real
    return float(max(0.0, ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean)))


def prdc_scores(real: np.ndarray, fake: np.ndarray, nearest_k: int = NEAREST_K) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020, the ``prdc`` package) of
    feature sets (N, D). Precision/density: how much of the synthetic set lies on the real
    manifold; recall/coverage: how much of the real manifold the synthetic set reaches."""
    if min(len(real), len(fake)) <= nearest_k:
        raise FedPGGANError(f"precision/recall need more than {nearest_k} real and synthetic images "
                            f"(got {len(real)} and {len(fake)}); use a larger test split or --n-synthetic")
    with contextlib.redirect_stdout(io.StringIO()):   # the package prints the set sizes
        scores = compute_prdc(real.astype(np.float32), fake.astype(np.float32), nearest_k)
    return {k: float(v) for k, v in scores.items()}


def label_fidelity(judge: SmallCNN, images: torch.Tensor, requested: torch.Tensor) -> dict[str, Any]:
    """Share of images for which a classifier trained on real data predicts the label the
    generator was asked for: overall and per requested class (NaN for a class not asked for)."""
    probs, _ = embed(judge, images)
    hit = probs.argmax(1) == requested.cpu().numpy()
    labels = requested.cpu().numpy()
    per_class = [float(hit[labels == c].mean()) if (labels == c).any() else math.nan
                 for c in range(probs.shape[1])]
    return {"overall": float(hit.mean()), "per_class": per_class}


def class_diversity(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray,
                    class_names: Sequence[str], threshold: float = COLLAPSE_THRESHOLD, seed: int = 0) -> dict[str, Any]:
    """Per class, mean pairwise feature distance of synthetic images / the same for real
    images (at most MAX_PER_CLASS of each); ``collapsed`` lists classes whose ratio < threshold."""
    rng = np.random.default_rng(seed)
    ratios, fake_spread, real_spread = [], [], []
    for c in range(len(class_names)):
        f = mean_pairwise_distance(fake[np.asarray(fake_labels) == c], rng)
        r = mean_pairwise_distance(real[np.asarray(real_labels) == c], rng)
        fake_spread.append(f)
        real_spread.append(r)
        ratios.append(f / r if r > 0 else math.nan)
    collapsed = [str(class_names[c]) for c, q in enumerate(ratios) if q < threshold]
    return {"ratio": ratios, "synthetic_spread": fake_spread, "real_spread": real_spread,
            "collapsed": collapsed, "threshold": threshold}


def mean_pairwise_distance(x: np.ndarray, rng: np.random.Generator) -> float:
    """Mean Euclidean distance over all pairs of (a random subset of) the rows of ``x``."""
    if len(x) < 2:
        return math.nan
    if len(x) > MAX_PER_CLASS:
        x = x[rng.choice(len(x), MAX_PER_CLASS, replace=False)]
    return float(torch.pdist(torch.from_numpy(np.ascontiguousarray(x))).mean())
