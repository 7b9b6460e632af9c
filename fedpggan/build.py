"""Turn a RunConfig and a dataset into the objects a trainer needs (shared by every trainer)."""

from __future__ import annotations

import dataclasses
import random
import sys

import numpy as np
import torch

from fedpggan.config import RunConfig, class_prior
from fedpggan.data import ImageDataset, open_dataset
from fedpggan.data.folder import EXTENSIONS
from fedpggan.data.medmnist import search_dirs
from fedpggan.errors import FedPGGANError
from pggan_model import PGGAN, GANConfig, ModelShape
from pggan_model.networks import upsampling_plan


def warn_without_dp(cfg: RunConfig) -> None:
    """A run without DP is allowed (baselines, ablations) but must never look like a private one."""
    if not cfg.dp:
        print("warning: training WITHOUT differential privacy (--epsilon none): the models and any synthetic data "
              "carry no privacy guarantee; pass --epsilon E for DP", file=sys.stderr)


def warn_single_class(data: ImageDataset) -> None:
    """A one-class dataset trains, but its samples cannot be judged by a classifier (TSTR)."""
    if data.num_classes == 1:
        print(f"warning: {data.name} has one class ({data.class_names[0]}): the generators learn it unconditionally, "
              "and `fedpggan evaluate` cannot measure utility (TSTR), only fidelity and memorisation",
              file=sys.stderr)


def refuse_classes_without_images(data: ImageDataset, fix: str = "add images or remove its folder") -> None:
    """Data that are all of a run's training data (one holder, or a simulation's pool) must hold every class it
    names; a single site of a federated run need not (its empty class folder keeps the class list the same)."""
    if empty := [name for name, n in zip(data.class_names, data.class_counts()) if n == 0]:
        raise FedPGGANError(f"{data.source}: class '{empty[0]}' has no training images (read: "
                            f"{', '.join(sorted(EXTENSIONS))}); {fix}")


MEASURED_SIZES_UP_TO = 64  # the benchmarks ran at 28 and 64 px


def warn_if_resized(data: ImageDataset, image_size: int) -> None:
    """Images stored at another size are resized to --image-size (28 unless set): say so, since
    everything the run writes describes them at that size."""
    stored = data.stored_size
    if stored == image_size:
        return
    own = ""
    if stored <= MEASURED_SIZES_UP_TO:  # larger sizes build, but nothing here was measured at them
        try:
            upsampling_plan(stored)
            own = f"; pass --image-size {stored} to train at the data's own size"
        except FedPGGANError:
            pass
    print(f"warning: {data.name}: {stored}x{stored} images are resized to {image_size}x{image_size} "
          f"(--image-size {image_size}){own}", file=sys.stderr)


def open_training_data(cfg: RunConfig, split: str = "train") -> ImageDataset:
    """The run's dataset; ``auto`` means PneumoniaMNIST when it can be found, else phantom.

    Only ``auto`` falls back, loudly: a dataset the user named that cannot be found is an error.
    """
    if cfg.dataset != "auto":
        return open_dataset(cfg.dataset, split, cfg.data_dir or None, cfg.image_size, cfg.seed)
    try:
        return open_dataset("pneumoniamnist", split, cfg.data_dir or None, cfg.image_size, cfg.seed)
    except FedPGGANError as exc:
        names = ("pneumoniamnist.npz", f"pneumoniamnist_{cfg.image_size}.npz")
        if any((d / name).is_file() for d in search_dirs(cfg.data_dir or None) for name in names):
            raise  # found but unreadable: a damaged file is the user's to fix, not a reason to train on phantom
        print(f"warning: --dataset auto: {exc} -- using 'phantom' instead (procedurally generated, NOT medical data)",
              file=sys.stderr)
        return open_dataset("phantom", split, None, cfg.image_size, cfg.seed)


def with_resolved_dataset(cfg: RunConfig, data: ImageDataset) -> RunConfig:
    """``cfg`` naming the data ``auto`` resolved to (its file, or phantom), as run.json must record
    it: a resume must never pick other data because a file appeared or vanished since."""
    if cfg.dataset != "auto":
        return cfg
    return dataclasses.replace(cfg, dataset=data.source if data.is_medical else "phantom")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedPGGANError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A seed for one (run seed, round, site, ...) tuple: rounds are reproducible on their own,
    which is what makes a resumed run equal an uninterrupted one."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def build_gan(cfg: RunConfig, image_size: int, channels: int, num_classes: int) -> PGGAN:
    shape = ModelShape(image_size=image_size, channels=channels, num_classes=num_classes,
                       latent_dim=cfg.latent_dim, g_width=cfg.g_width, d_width=cfg.d_width,
                       d_spectral_norm=cfg.d_spectral_norm)
    gan_cfg = GANConfig(loss_rule=cfg.loss_rule, lr_g=cfg.lr_g, lr_d=cfg.lr_d, ema_decay=cfg.ema_decay)
    return PGGAN(shape, gan_cfg)


def prior_tensor(cfg: RunConfig, num_classes: int) -> torch.Tensor | None:
    """The public class prior as a tensor (None = uniform); must match the class count."""
    weights = class_prior(cfg.class_prior)
    if weights is None:
        return None
    if len(weights) != num_classes:
        raise FedPGGANError(f"--class-prior has {len(weights)} weights but the dataset has {num_classes} classes")
    return torch.tensor(weights, dtype=torch.float)
