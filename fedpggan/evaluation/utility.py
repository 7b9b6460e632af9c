"""Utility: train on synthetic, test on real (TSTR), beside train on real, test on real (TRTR).

TSTR asks whether a classifier learnt only from the generators' images works on real
patients; TRTR (the same classifier and step budget on the real training split) is the
ceiling it is read against. Each seed draws a fresh synthetic set (when given a GAN) and
trains a fresh classifier; mean and sample std over seeds are reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedpggan.data import ImageDataset
from fedpggan.errors import FedPGGANError
from fedpggan.evaluation.classifier import (ClassifierPrivacy, SmallCNN, TrainingBudget, seeded,
                                            train_classifier)
from fedpggan.evaluation.scores import evaluate_classifier, summarise
from pggan_model import PGGAN
from pggan_model.pggan import GENERATOR_CHOICES

SAMPLE_CHUNK = 500
TrainSet = tuple[torch.Tensor, torch.Tensor]


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """``3`` -> [0, 1, 2]; an explicit list is kept."""
    out = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not out:
        raise FedPGGANError("--seeds must be >= 1")
    return out


def synthetic_set(gan: PGGAN, n: int, generator: str = "both", seed: int = 0,
                  class_mix: Sequence[int] | None = None) -> TrainSet:
    """``n`` EMA samples, on the CPU; with ``both``, each chunk is half G1, half G2. Reproducible
    for a seed. Labels are balanced (class c gets n/K +-1: what TSTR trains on), or in the
    proportions of ``class_mix`` (e.g. the real test split's class counts: figures that compare
    the synthetic set with real images, such as FID, must not measure a difference in class mix)."""
    if generator not in GENERATOR_CHOICES:
        raise FedPGGANError(f"--generator {generator}: choose one of {', '.join(GENERATOR_CHOICES)}")
    if gan.single and generator == "2":
        raise FedPGGANError("--generator 2: this run is the single-generator baseline (G2 is never trained); "
                            "use --generator 1 or both")
    if n < gan.shape.num_classes:
        raise FedPGGANError(f"--n-synthetic {n}: must be at least the class count ({gan.shape.num_classes})")
    device = next(gan.parameters()).device
    labels = torch.arange(n) % gan.shape.num_classes if class_mix is None else mixed_labels(n, class_mix, seed)
    with seeded(seed, device):
        images = torch.cat([gan.sample(len(chunk), chunk, generator=generator)[0].cpu()
                            for chunk in labels.split(SAMPLE_CHUNK)])
    return images, labels


def mixed_labels(n: int, counts: Sequence[int], seed: int) -> torch.Tensor:
    """``n`` labels in the proportions of ``counts`` (largest remainders), shuffled so that every
    chunk, and each generator's half of it, holds the same mix."""
    weights = np.asarray(counts, dtype=float)
    exact = n * weights / weights.sum()
    per_class = np.floor(exact).astype(int)
    per_class[np.argsort(per_class - exact)[: n - per_class.sum()]] += 1
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(per_class))
    return labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


def scores_over_seeds(train_set: Callable[[int], TrainSet], real_test: ImageDataset, seeds: int | Sequence[int],
                      budget: TrainingBudget = TrainingBudget(), device: str | torch.device = "cpu",
                      privacy: ClassifierPrivacy | None = None, desc: str = "classifier",
                      progress: bool = True) -> tuple[dict[str, Any], list[SmallCNN]]:
    """For each seed: train on ``train_set(seed)``, score on ``real_test``. Returns the
    summary ({metric: {"mean", "std", "per_seed"}}) and the trained classifiers."""
    models, scores = [], []
    for seed in seed_list(seeds):
        images, labels = train_set(seed)
        model = train_classifier(images, labels, real_test.num_classes, budget, seed, device, privacy,
                                 desc=f"{desc} seed {seed}", progress=progress)
        models.append(model)
        scores.append(evaluate_classifier(model, real_test.images, real_test.labels))
    summary = summarise(scores)
    if privacy is not None:
        summary["privacy"] = {k: v for k, v in models[0].training_info.items() if k not in ("steps", "lr")}
    return summary, models


def trtr(real_train: ImageDataset, real_test: ImageDataset, seeds: int | Sequence[int] = 3,
         budget: TrainingBudget = TrainingBudget(), device: str | torch.device = "cpu",
         privacy: ClassifierPrivacy | None = None, progress: bool = True) -> dict[str, Any]:
    """Train on the real training split, test on real: the reference for TSTR, or (with
    ``privacy``) the direct DP-SGD classifier a synthetic-data pipeline must beat."""
    check_compatible(real_train, real_test)
    desc = "TRTR (DP-SGD)" if privacy else "TRTR"
    return scores_over_seeds(lambda _: (real_train.images, real_train.labels), real_test, seeds, budget,
                             device, privacy, desc, progress)[0]


def tstr(gan_or_images: PGGAN | TrainSet, real_train: ImageDataset | None, real_test: ImageDataset,
         n_synthetic: int = 5000, seeds: int | Sequence[int] = 3, generator: str = "both",
         budget: TrainingBudget = TrainingBudget(), device: str | torch.device = "cpu",
         progress: bool = True) -> dict[str, Any]:
    """{"tstr": summary, "trtr": summary} (no "trtr" when ``real_train`` is None).

    ``gan_or_images`` is a PGGAN (each seed samples ``n_synthetic`` fresh images) or a fixed
    (images, labels) pair (only the classifier's seed varies)."""
    if isinstance(gan_or_images, PGGAN):
        check_matches_gan(real_test, gan_or_images)
    elif tuple(gan_or_images[0].shape[1:]) != tuple(real_test.images.shape[1:]):
        raise FedPGGANError(f"synthetic images of shape {tuple(gan_or_images[0].shape[1:])} do not match the real "
                            f"test images {tuple(real_test.images.shape[1:])}; resize them first")

    def train_set(seed: int) -> TrainSet:
        if isinstance(gan_or_images, PGGAN):
            return synthetic_set(gan_or_images, n_synthetic, generator, seed)
        return gan_or_images

    result = {"tstr": scores_over_seeds(train_set, real_test, seeds, budget, device, desc="TSTR",
                                        progress=progress)[0]}
    if real_train is not None:
        result["trtr"] = trtr(real_train, real_test, seeds, budget, device, progress=progress)
    return result


def check_compatible(a: ImageDataset, b: ImageDataset) -> None:
    if (a.num_classes, a.channels, a.image_size) != (b.num_classes, b.channels, b.image_size):
        raise FedPGGANError(f"{a.name} and {b.name}: splits differ in classes, channels or image size "
                            f"({a.num_classes}/{a.channels}/{a.image_size} vs {b.num_classes}/{b.channels}/"
                            f"{b.image_size}); use matching train and test data")


def check_matches_gan(real: ImageDataset, gan: PGGAN) -> None:
    """Real images must be what the generators make: same classes, channels and size."""
    want = (gan.shape.num_classes, gan.shape.channels, gan.shape.image_size)
    have = (real.num_classes, real.channels, real.image_size)
    if have != want:
        raise FedPGGANError(f"real data {real.name}: {have[0]} classes, {have[1]} channel(s), {have[2]} px, but the "
                            f"run's generators make {want[0]} classes, {want[1]} channel(s), {want[2]} px; "
                            "use the dataset the run was trained on")
