"""What a new simulation checks before it makes its run folder and starts Flower's engine.

Otherwise an unsupported image size or an unreachable budget shows only once the sites (~20 s
into the engine's start) build the model or calibrate the noise, after the folder was made.
Each check applies the rule training applies, so the two cannot disagree. (``fedpggan train``
needs no pre-flight: it builds and calibrates before it makes its folder.)
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

from fedpggan.config import RunConfig
from fedpggan.errors import FedPGGANError
from fedpggan.privacy.accounting import MAX_SIGMA, UnreachableBudget
from fedpggan.privacy.mechanism import site_mechanism
from pggan_model.networks import upsampling_plan


def check_image_size(image_size: int, option: str = "--image-size") -> None:
    """The sizes the networks can be built for (pggan_model.networks.upsampling_plan)."""
    upsampling_plan(image_size, option)


def check_simulation_resources(cfg: RunConfig) -> None:
    """Ray schedules a site only where its --client-cpus / --client-gpus fit; a share this machine
    can never give leaves the engine waiting forever. A Ray cluster (RAY_ADDRESS) is not checked."""
    if os.environ.get("RAY_ADDRESS"):
        return
    gpus = torch.cuda.device_count()
    if cfg.client_gpus > gpus:
        raise FedPGGANError(f"--client-gpus {cfg.client_gpus:g}: this machine has {gpus} CUDA GPU(s), so no site could be "
                            f"scheduled; use {'a share of one GPU (e.g. 0.2)' if gpus else '0'}")
    cores = os.cpu_count() or 1
    if cfg.client_cpus > cores:
        raise FedPGGANError(f"--client-cpus {cfg.client_cpus:g}: more than the {cores} CPU cores here, so no site could "
                            f"be scheduled; use at most {cores}")


def check_federated_budget(cfg: RunConfig, site_sizes: Iterable[int]) -> None:
    """Calibrate every distinct site size as its site will (the results are cached on disk, so
    the sites reuse them); a budget no noise level meets is reported in the run's options."""
    if not cfg.dp:
        return
    steps = cfg.rounds * cfg.local_steps
    for n in sorted(set(site_sizes)):
        try:
            site_mechanism(cfg, n, steps)
        except UnreachableBudget:
            after = " after the embedding release (--embedding-share)" if cfg.embedding_weight > 0 else ""
            raise FedPGGANError(
                f"--epsilon {cfg.epsilon:g}: no noise level up to {MAX_SIGMA:g} keeps --rounds {cfg.rounds} x "
                f"--local-steps {cfg.local_steps} = {steps} DP-SGD steps of a site of {n} images (--batch-size "
                f"{cfg.batch_size}){after} within it; raise --epsilon, or lower --rounds, --local-steps or --batch-size") from None
