"""The DP mechanism a site of n records runs under a run's config, fixed before it trains.

The one calibration that client/site_round.py (ensure_mechanism), server/federated_run.py
(mechanism_for), fedpggan/train.py and the pre-flight check (fedpggan/preflight.py) all call, so
a check made before a run starts fails exactly when the run would.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

from fedpggan.config import RunConfig, sites_per_round
from fedpggan.errors import FedPGGANError
from fedpggan.privacy.accounting import calibrate_noise, default_delta
from fedpggan.privacy.dp_discriminator import sample_rate
from fedpggan.privacy.feature_release import release_history, release_noise

# --aggregation weighted with a fraction of the sites per round: more possible sets than this are sampled
WEIGHTED_NOISE_DRAWS = 5000


class Mechanism(NamedTuple):
    noise_multiplier: float
    sample_rate: float
    delta: float
    release_noise: float | None  # the one-shot embedding release's noise (None: no release)


def release_for(cfg: RunConfig, num_records: int) -> float | None:
    """Noise of the site's embedding release (None without one); raises in the user's options
    when its share of the budget is too small to certify."""
    delta = cfg.delta or default_delta(num_records)
    return release_noise(cfg.epsilon, cfg.embedding_share, delta, cfg.accountant) if cfg.embedding_weight > 0 else None


def site_mechanism(cfg: RunConfig, num_records: int, steps: int) -> Mechanism:
    """sigma for ``steps`` DP-SGD steps after the release, so that the whole run meets the
    budget (raises accounting.UnreachableBudget when no sigma does).

    Privacy assumption: delta < 1/n, else the guarantee allows publishing a whole record (the
    audit fails such a run), so a larger delta is refused before any spend."""
    q, delta = sample_rate(num_records, cfg.batch_size), cfg.delta or default_delta(num_records)
    if delta >= 1 / num_records:
        raise FedPGGANError(f"--delta {delta:g} is not below 1/n = {1 / num_records:.3g} for a site of {num_records} "
                            f"images: it would allow leaking a whole record; use e.g. {0.1 / num_records:.1g}, or 0 for "
                            "the default min(1e-5, 1/(10 n))")
    release = release_for(cfg, num_records)
    if release is not None and cfg.release_aggregation == "secure" and not cfg.delta and delta != default_delta(1):
        # Each share carries 1/sqrt(N) of its own site's release noise, so the sum is as noisy as one
        # release only if every site's noise is the same: one delta for all (sites of <= 10 000 images
        # all get 1e-5 by default; a larger site's default is smaller, hence its noise larger).
        raise FedPGGANError(f"--release-aggregation secure needs one delta at every site, but --delta 0 gives this site "
                            f"of {num_records} images its own min(1e-5, 1/(10 n)) = {delta:.2g}: set --delta for the "
                            f"run, at most 1/(10 n) of the largest site (e.g. {delta:.1g} if this site is the largest)")
    sigma = calibrate_noise(cfg.epsilon, delta, q, steps, cfg.accountant, release_history(release))
    return Mechanism(sigma, q, delta, release)


def averaged_d_noise(mechanisms: Iterable[tuple[Mechanism, int]], averaged_per_round: int, weighted: bool = False) -> float:
    """The noise std of the averaged discriminator's per-step gradient, relative to the clipping norm:
    each site's sigma / B (B = n q, the expected batch its noisy sum is divided by), root mean square over
    the ``(mechanism, n)`` of the sites, over sqrt(sites averaged per round). ``weighted`` (--aggregation
    weighted): the weighted mean of the k sites a round averages has noise sqrt(sum_S (n_i / N_S)^2 (sigma_i / B_i)^2);
    its root mean square over the rounds' uniformly drawn sets S of k sites (every set while there are few, else
    WEIGHTED_NOISE_DRAWS seeded draws). With equal counts both give the same. What --g-steps 0 decides by
    (RunConfig.generator_steps); 0 without DP. Computed from public facts (sizes, the config) only."""
    sites = [(m.noise_multiplier / (n * m.sample_rate), n) for m, n in mechanisms]
    if not sites:
        return 0.0
    if not weighted:
        return math.sqrt(sum(x * x for x, _ in sites) / len(sites)) / math.sqrt(max(averaged_per_round, 1))
    k = min(max(averaged_per_round, 1), len(sites))
    if math.comb(len(sites), k) <= WEIGHTED_NOISE_DRAWS:
        sets = list(itertools.combinations(range(len(sites)), k))
    else:
        rng = np.random.default_rng(0)
        sets = [rng.choice(len(sites), size=k, replace=False) for _ in range(WEIGHTED_NOISE_DRAWS)]

    def variance(chosen: Sequence[int]) -> float:
        total = sum(sites[i][1] for i in chosen)
        return sum((sites[i][1] / total * sites[i][0]) ** 2 for i in chosen)

    return math.sqrt(sum(variance(s) for s in sets) / len(sets))


def run_d_noise(cfg: RunConfig, sizes: Sequence[int], mechanism_for: Callable[[int], Mechanism]) -> float:
    """averaged_d_noise of a run whose sites hold ``sizes`` records (public), each under ``mechanism_for(n)``: 0 without
    DP. The generators learn from the average of ceil(fraction x sites) discriminators a round, or from one with
    --generator-training local (each site's generators learn from its own D); --aggregation weighted weighs them by size."""
    if not cfg.dp:
        return 0.0
    averaged = 1 if cfg.generator_training == "local" else sites_per_round(cfg.fraction, len(sizes))
    return averaged_d_noise([(mechanism_for(n), n) for n in sizes], averaged,
                            weighted=cfg.aggregation == "weighted" and cfg.generator_training != "local")
