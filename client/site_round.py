"""One federated round at a site, without Flower: budget check, DP-SGD on D, the spend.

Privacy assumptions (see fedpggan.privacy): Poisson sampling, per-sample clipping and
Gaussian noise by Opacus; the noise multiplier is calibrated once, before the first round,
for the whole planned run (rounds x local steps at this site's sample rate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from client.site import SiteState
from fedpggan.build import derived_seed, prior_tensor
from fedpggan.config import RunConfig
from fedpggan.data import ImageDataset
from fedpggan.errors import FedPGGANError
from fedpggan.privacy import DiscriminatorTrainer, PrivacySettings, calibrate_noise, default_delta, epsilon_of, extend_history
from fedpggan.privacy.dp_discriminator import sample_rate
from pggan_model import PGGAN, GeneratorTrainer

# Numerical slack when comparing a projected epsilon with the budget.
BUDGET_TOLERANCE = 1e-6


@dataclass
class RoundResult:
    status: str  # "trained" or "exhausted"
    privacy: dict[str, float]
    generator_stats: list[dict[str, float]]


def ensure_mechanism(state: SiteState, cfg: RunConfig, num_records: int) -> None:
    """Fix this site's DP mechanism on first contact: q from its (public) size, sigma calibrated
    for the whole planned run so that the final epsilon meets the budget."""
    if state.noise_multiplier is not None:
        return
    state.sample_rate = sample_rate(num_records, cfg.batch_size)
    state.delta = cfg.delta or default_delta(num_records)
    state.budget_epsilon = cfg.epsilon
    state.accountant = cfg.accountant
    state.planned_steps = cfg.rounds * cfg.local_steps
    state.noise_multiplier = calibrate_noise(cfg.epsilon, state.delta, state.sample_rate, state.planned_steps, cfg.accountant)
    state.save()


def spend(state: SiteState, steps: int) -> dict[str, float]:
    epsilon = epsilon_of([tuple(h) for h in state.history], state.delta, state.accountant)
    return {
        "epsilon": epsilon, "delta": state.delta, "noise_multiplier": state.noise_multiplier,
        "sample_rate": state.sample_rate, "steps": steps, "budget_epsilon": state.budget_epsilon,
        "total_steps": sum(int(h[2]) for h in state.history),
    }


def run_site_round(gan: PGGAN, data: ImageDataset, cfg: RunConfig, state: SiteState, round_num: int,
                   site_index: int) -> RoundResult:
    """Train ``gan.d`` (and, with local generator training, G1/G2) for one round in place."""
    torch.manual_seed(derived_seed(cfg.seed, round_num, site_index))
    privacy = None
    previous = [tuple(h) for h in state.history]
    if cfg.dp:
        ensure_mechanism(state, cfg, len(data))
        if state.exhausted:
            return RoundResult("exhausted", spend(state, 0), [])
        planned = extend_history(previous, state.noise_multiplier, state.sample_rate, cfg.local_steps)
        if epsilon_of(planned, state.delta, state.accountant) > state.budget_epsilon + BUDGET_TOLERANCE:
            state.exhausted = True
            state.save()
            return RoundResult("exhausted", spend(state, 0), [])
        # Privacy first: record the spend before touching the data.
        state.history = [list(h) for h in planned]
        state.rounds[str(round_num)] = {"status": "reserved", "steps": cfg.local_steps}
        state.save()
        privacy = PrivacySettings(state.noise_multiplier, cfg.max_grad_norm, state.delta, state.accountant, cfg.grad_sample_mode)
    prior = prior_tensor(cfg, data.num_classes)
    trainer = DiscriminatorTrainer(gan, data.images, data.labels, cfg.batch_size, privacy, previous, prior)
    trainer.train(cfg.local_steps)
    if privacy is not None and [tuple(map(float, h)) for h in trainer.history] != [tuple(map(float, h)) for h in state.history]:
        raise FedPGGANError(f"site accountant mismatch: Opacus recorded {trainer.history}, the site reserved {state.history}")
    g_stats = []
    if cfg.generator_training == "local":
        g_trainer = GeneratorTrainer(gan)
        g_stats = [g_trainer.step(cfg.g_batch_size, prior) for _ in range(cfg.g_steps)]
    if privacy is None:
        return RoundResult("trained", {"epsilon": math.inf, "steps": cfg.local_steps}, g_stats)
    state.rounds[str(round_num)]["status"] = "done"
    state.save()
    return RoundResult("trained", spend(state, cfg.local_steps), g_stats)


def public_facts(site_id: str, data: ImageDataset) -> dict[str, Any]:
    """What a site tells the server about itself: shape and class names, and its size (public)."""
    return {
        "site-id": site_id, "num-records": len(data), "image-size": data.image_size, "channels": data.channels,
        "class-names": list(data.class_names), "dataset": data.name, "is-medical": data.is_medical,
    }
