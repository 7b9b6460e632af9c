"""Classification scores of a trained classifier on real test images, and their seed summary.

AUC: for 2 classes the ROC AUC of the class-1 probability; for more, the one-vs-rest AUC of
each class averaged with equal weight (macro), over the classes that have both positives
and negatives in the test set (a class absent from it has no defined AUC).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedpggan.evaluation.classifier import SmallCNN, embed


def classification_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """{"accuracy", "auc", "per_class_recall"} of class probabilities (N, K) against labels;
    a class with no test image has recall NaN."""
    labels = np.asarray(labels)
    k = probs.shape[1]
    pred = probs.argmax(1)
    recall = [float((pred[labels == c] == c).mean()) if (labels == c).any() else math.nan for c in range(k)]
    return {"accuracy": float((pred == labels).mean()), "auc": macro_auc(probs, labels), "per_class_recall": recall}


def macro_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    aucs = [roc_auc_score(labels == c, probs[:, c]) for c in classes if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean(aucs)) if aucs else math.nan


def evaluate_classifier(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy, AUC and per-class recall of ``model`` on (images, labels)."""
    probs, _ = embed(model, images)
    return classification_scores(probs, labels.cpu().numpy())


def summarise(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed score dicts -> {metric: {"mean", "std", "per_seed"}}; std is the sample std
    (ddof 1) over seeds, 0 for one seed. Per-class recall is summarised class by class."""
    out: dict[str, Any] = {}
    for key in per_seed[0]:
        values = np.array([s[key] for s in per_seed], dtype=float)   # (seeds,) or (seeds, K)
        with warnings.catch_warnings():   # a class absent from the test set is NaN in every seed
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(values, axis=0)
            std = np.nanstd(values, axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])
        out[key] = {"mean": mean.tolist(), "std": np.asarray(std).tolist(), "per_seed": values.tolist()}
    return out
