"""Privacy accounting for DP-SGD on the discriminator, on top of Opacus' accountants.

Privacy assumptions every function here relies on:
- the unit of privacy is one image (record) at one site, add/remove adjacency;
- each D step samples that site's records by Poisson sampling at rate q and adds Gaussian
  noise of std sigma * C to the sum of per-sample gradients clipped to norm C;
- a site's record count is public (it sets q, which the ledger records).
A site's spend is its accountant *history*, a list of (sigma, q, steps): epsilon is always
recomputed from the whole history, so spend is never forgotten between rounds or restarts.
"""

from __future__ import annotations

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedpggan.errors import FedPGGANError

ACCOUNTANTS = ("prv", "rdp")
History = list[tuple[float, float, int]]


def default_delta(num_records: int) -> float:
    """delta = min(1e-5, 1 / (10 n)): well below 1/n, so no record is likely to leak outright."""
    return min(1e-5, 1.0 / (10 * num_records))


def epsilon_of(history: History, delta: float, accountant: str = "prv") -> float:
    """Epsilon spent by a whole DP-SGD history at ``delta`` (0 for an empty history)."""
    if not history:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(t)) for s, q, t in history]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv") -> float:
    """Noise multiplier so that ``steps`` DP-SGD steps at ``sample_rate`` end at <= epsilon.

    Calibrated once, for the whole planned run, so the final spend meets the budget.
    """
    if epsilon <= 0:
        raise FedPGGANError(f"--epsilon {epsilon} must be > 0 (or leave it out to train without DP)")
    if not 0 < delta < 1:
        raise FedPGGANError(f"--delta {delta} must be in (0, 1)")
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant, epsilon_tolerance=0.01,
            )
        )
    except ValueError as exc:
        raise FedPGGANError(
            f"--epsilon {epsilon}: no noise level reaches this budget for {steps} steps at sample rate "
            f"{sample_rate:.4g} ({exc}); raise --epsilon or lower the number of steps"
        ) from exc


def extend_history(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """History after ``steps`` more steps (merged with the last entry when sigma and q repeat)."""
    history = [tuple(h) for h in history]
    if history and history[-1][0] == noise_multiplier and history[-1][1] == sample_rate:
        s, q, t = history[-1]
        return [*history[:-1], (s, q, int(t) + steps)]
    return [*history, (noise_multiplier, sample_rate, steps)]
