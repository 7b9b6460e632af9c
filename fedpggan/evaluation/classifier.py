"""The one fixed classifier behind every utility and fidelity score: ``SmallCNN``.

Every TSTR/TRTR number and every feature-space metric depends on this network, so it is fixed
and documented here rather than chosen per run:

* 3 blocks of [Conv 3x3 stride 2 -> GroupNorm(8 groups) -> ReLU], widths 16, 32, 64
  (28 px: 28 -> 14 -> 7 -> 4; 64 px: 64 -> 32 -> 16 -> 8), then global average pooling
  -> a 64-d feature vector (the penultimate layer, used for FID, PRDC and diversity)
  -> Linear -> one logit per class.
* Trained with Adam (lr 1e-3), cross-entropy, batch 128, for a fixed number of steps (default
  400) whatever the training-set size, so TSTR and TRTR get the same compute budget.
* GroupNorm, not BatchNorm: Opacus cannot compute per-sample gradients through BatchNorm
  (it mixes the samples of a batch), so with GroupNorm the very same network trains plainly
  or with DP-SGD (``privacy=ClassifierPrivacy(...)``) and the two are directly comparable.
* Strided convolutions instead of pooling: on a 2-core CPU they are several times faster
  for the same depth, which keeps a 3-seed evaluation within minutes.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from fedpggan.config import EVALUATION_REPORT_SIZE
from fedpggan.errors import FedPGGANError

WIDTHS = (16, 32, 64)
GROUPS = 8
INFERENCE_BATCH = 1024


class SmallCNN(nn.Module):
    """The fixed classifier (see the module docstring). ``training_info`` records how it was
    trained (steps, batch size and, for DP-SGD, the mechanism and the epsilon spent)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = channels
        for width in WIDTHS:
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.GroupNorm(GROUPS, width), nn.ReLU()]
            c = width
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, num_classes)
        self.training_info: dict[str, Any] = {}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class TrainingBudget:
    """How long the classifier trains: ``steps`` optimiser steps, or ``epochs`` passes over
    the training set when given (then the step count depends on the set's size)."""

    steps: int = EVALUATION_REPORT_SIZE["steps"]
    epochs: float | None = None
    batch_size: int = 128
    lr: float = 1e-3

    def steps_for(self, num_images: int) -> int:
        if self.epochs is None:
            return self.steps
        return max(1, math.ceil(self.epochs * num_images / self.batch_size))


@dataclass(frozen=True)
class ClassifierPrivacy:
    """Train with Opacus DP-SGD to (epsilon, delta); the noise is calibrated for the whole
    step budget at Poisson sample rate batch_size / n. ``delta`` None = min(1e-5, 1/(10 n))."""

    epsilon: float
    delta: float | None = None
    max_grad_norm: float = 1.0
    accountant: str = "prv"


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block with torch's RNG seeded, restoring the caller's RNG state afterwards, so an
    evaluation is reproducible without disturbing anything around it."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None,
                     budget: TrainingBudget = TrainingBudget(), seed: int = 0, device: str | torch.device = "cpu",
                     privacy: ClassifierPrivacy | None = None, desc: str = "classifier",
                     progress: bool = True) -> SmallCNN:
    """Train a SmallCNN on images in [-1, 1] (N, C, H, W); deterministic for a seed on CPU."""
    if len(images) != len(labels) or len(images) < 2:
        raise FedPGGANError(f"{desc}: needs at least 2 images with one label each (got {len(images)} images, "
                            f"{len(labels)} labels)")
    num_classes = num_classes or int(labels.max()) + 1
    steps = budget.steps_for(len(images))
    with seeded(seed, device):
        model = SmallCNN(images.shape[1], num_classes).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=budget.lr)
        if privacy is None:
            _train_plain(model, optimizer, images, labels, steps, budget.batch_size, device, desc, progress)
            model.training_info = {"steps": steps, "batch_size": budget.batch_size, "lr": budget.lr, "dp": False}
        else:
            info = _train_dp(model, optimizer, images, labels, steps, budget.batch_size, privacy, device,
                             desc, progress)
            model.training_info = {"steps": steps, "batch_size": budget.batch_size, "lr": budget.lr,
                                   "dp": True, **info}
    return model.eval()


def _train_plain(model: SmallCNN, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                 steps: int, batch_size: int, device: str | torch.device, desc: str, progress: bool) -> None:
    """``steps`` Adam steps on shuffled mini-batches (a new permutation each pass)."""
    order = torch.randperm(len(images))
    pos = 0
    for _ in tqdm(range(steps), desc=desc, unit="step", leave=False, disable=not progress):
        if pos >= len(order):
            order, pos = torch.randperm(len(images)), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(images[idx].to(device)), labels[idx].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _train_dp(model: SmallCNN, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
              steps: int, batch_size: int, privacy: ClassifierPrivacy, device: str | torch.device, desc: str,
              progress: bool) -> dict[str, Any]:
    """DP-SGD with Opacus: Poisson batches, per-sample clipping, Gaussian noise calibrated so
    that ``steps`` steps end at ``privacy.epsilon``; returns the mechanism and epsilon spent."""
    from opacus import PrivacyEngine

    from fedpggan.privacy import calibrate_noise, default_delta
    from fedpggan.privacy.dp_discriminator import sample_rate

    delta = privacy.delta if privacy.delta is not None else default_delta(len(images))
    q = sample_rate(len(images), batch_size)
    sigma = calibrate_noise(privacy.epsilon, delta, q, steps, privacy.accountant)
    engine = PrivacyEngine(accountant=privacy.accountant)
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size)
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=privacy.max_grad_norm, poisson_sampling=True)
    batches = iter(loader)
    with warnings.catch_warnings():   # Opacus' hooks on the first layer fire without input gradients: harmless
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for _ in tqdm(range(steps), desc=f"{desc} (DP-SGD)", unit="step", leave=False, disable=not progress):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            loss = F.cross_entropy(private(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    private.cleanup()  # the wrapper shares model's parameters; drop its hooks so model is plain again
    return {"epsilon": float(engine.get_epsilon(delta)), "delta": delta, "noise_multiplier": sigma,
            "sample_rate": q, "max_grad_norm": privacy.max_grad_norm, "accountant": privacy.accountant}


@torch.no_grad()
def embed(model: SmallCNN, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities (N, K), penultimate features (N, 64)) as float64 numpy arrays."""
    device = next(model.parameters()).device
    model.eval()
    probs, feats = [], []
    for chunk in images.split(INFERENCE_BATCH):
        f = model.features(chunk.to(device))
        feats.append(f.cpu())
        probs.append(model.head(f).softmax(1).cpu())
    return torch.cat(probs).double().numpy(), torch.cat(feats).double().numpy()
